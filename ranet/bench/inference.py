"""Inference benchmark: batch-1 latency of every path, and how cost grows with batch size.

    python -m ranet.bench.inference --model_dir=runs/ranet --model_dir=runs/vgg16 \\
        --model_dir=runs/resnet50 --split=validation --json=bench_inference.json

Every model runs the same compiled paths on the same images, timed interleaved in one
process (``ranet.inference.comparison``). It prints the latency table, the throughput of the
adaptive and full paths at each batch size, and the performance targets as measured ratios.
"""


from absl import flags

from ranet import cli, jsonio
from ranet.inference import comparison, latency
from ranet.inference.comparison import ComparisonOptions

# Batch-1 speed-up of RANet's adaptive path over each baseline's full pass (issue 5), by the
# baseline's architecture.
BASELINE_SPEEDUP_TARGETS = {"vgg16": 3.0, "resnet50": 6.0}
# Batch-1 speed-up of the adaptive path over the seed's Model.predict per image.
KERAS_PREDICT_SPEEDUP_TARGET = 20.0
# Batched: the adaptive path's throughput gain reaches the multiply-add saving within this.
BATCHED_SAVING_SHARE = 0.8


def define_flags(values: flags.FlagValues) -> None:
    cli.define_fields(ComparisonOptions, values)
    for name, default in (("split", "validation"), ("latency_images", 200),
                          ("throughput_images", 1024)):
        values.set_default(name, default)
    flags.DEFINE_list("batch_sizes", ["1", "8", "64", "256"],
                      "Batch sizes of the throughput sweep.", flag_values=values)
    flags.DEFINE_string("json", None, "Also write the results here.", flag_values=values)


def targets(result: comparison.Comparison) -> list:
    """The performance targets, as (label, measured ratio, needed ratio): higher is better."""
    latency_ms = {name: {path: stats.p50 for path, stats in paths.items()}
                  for name, paths in result.latency.items()}
    baselines = [(m.name, m.config.model.name) for m in result.models if m.model.num_exits == 1]
    rows = []
    for loaded, evaluation in zip(result.models, result.evaluations):
        if evaluation.default is None:
            continue
        name, adaptive_p50 = loaded.name, latency_ms[loaded.name]["adaptive"]
        rows.append((f"{name}: keras_predict / adaptive (batch 1)",
                     latency_ms[name]["keras_predict"] / adaptive_p50,
                     KERAS_PREDICT_SPEEDUP_TARGET))
        for baseline, architecture in baselines:
            if architecture in BASELINE_SPEEDUP_TARGETS:
                rows.append((f"{baseline} full / {name} adaptive (batch 1)",
                             latency_ms[baseline]["full"] / adaptive_p50,
                             BASELINE_SPEEDUP_TARGETS[architecture]))
        largest = max(result.throughput[name])
        measured = result.throughput[name][largest]
        saving = loaded.cost.exits[-1].macs / evaluation.default.point.expected_macs
        rows.append((f"{name}: adaptive / full throughput at batch {largest} "
                     f"(MAC saving {saving:.2f}x)", measured["adaptive"] / measured["full"],
                     BATCHED_SAVING_SHARE * saving))
    return rows


def main(values: flags.FlagValues) -> dict:
    options = cli.from_flags(ComparisonOptions, values)
    try:
        batch_sizes = sorted({int(b) for b in values.batch_sizes})
    except ValueError:
        raise ValueError("--batch_sizes takes comma-separated integers. "
                         f"Received: --batch_sizes={','.join(values.batch_sizes)}") from None
    result = comparison.compare(options, throughput_batch_sizes=batch_sizes)
    operating_points = {
        loaded.name: {"last_exit_accuracy": evaluation.exit_accuracy[-1],
                      **evaluation.default.to_json()}
        for loaded, evaluation in zip(result.models, result.evaluations) if evaluation.default}
    latency_ms = {name: {path: stats.to_json() for path, stats in paths.items()}
                  for name, paths in result.latency.items()}
    rows = targets(result)

    environment = latency.device_info()
    print(f"\n{environment['device']}; TensorFlow {environment['tensorflow']}; "
          f"XLA {'on' if options.xla else 'off'} (batch-1 paths)\n")
    for name, point in operating_points.items():
        print(f"{name}: default operating point {point['accuracy']:.2%} (every exit: "
              f"{point['last_exit_accuracy']:.2%}), {point['expected_macs'] / 1e6:.2f} M "
              f"multiply-adds expected, exit fractions "
              + ", ".join(f"{f:.3f}" for f in point["exit_fractions"]))
    print(f"\n{'model':<28} {'path':<14} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8}")
    for name, paths in latency_ms.items():
        for path, s in paths.items():
            print(f"{name:<28} {path:<14} {s['p50']:>8.2f} {s['p90']:>8.2f} {s['p99']:>8.2f}")
    print(f"\n{'model':<28} {'path':<14} " + " ".join(f"{f'b={b}':>9}" for b in batch_sizes)
          + "   (images/s)")
    for name, by_batch in result.throughput.items():
        for path in by_batch[batch_sizes[0]]:
            print(f"{name:<28} {path:<14} "
                  + " ".join(f"{by_batch[b][path]:>9.0f}" for b in batch_sizes))
    print(f"\n{'target':<70} {'measured':>9} {'needed':>7}")
    for label, measured, needed in rows:
        print(f"{label:<70} {measured:>8.1f}x {needed:>6.1f}x "
              f"{'ok' if measured >= needed else 'MISSED'}")
    output = {"environment": environment, "xla": options.xla,
              "operating_points": operating_points, "latency_ms": latency_ms,
              "throughput_ips": result.throughput,
              "targets": [{"target": label, "measured": measured, "needed": needed}
                          for label, measured, needed in rows]}
    if values.json:
        jsonio.write(values.json, output)
    return output


def run() -> None:
    cli.run(main, define_flags)


if __name__ == "__main__":
    run()

"""Inference benchmark: batch-1 latency of every path, and how cost grows with batch size.

    python -m ranet.bench.inference --model_dir=runs/ranet --model_dir=runs/vgg16 \\
        --model_dir=runs/resnet50 --split=validation --json=bench_inference.json

Every model runs the same compiled paths on the same images, timed interleaved in one
process (``ranet.latency``). It prints the latency table, the throughput of the adaptive
and full paths at each batch size, and the issue's targets as measured ratios.
"""

import json
import os

from absl import flags, logging

from ranet import cli

FLAGS = flags.FLAGS
flags.DEFINE_multi_string("model_dir", None, "Trained model directories (repeat).")
flags.DEFINE_enum("split", "validation", ["test", "validation"], "Images to time on.")
flags.DEFINE_string("data_dir", None, "Overrides the data location saved with the models.")
flags.DEFINE_bool("xla", False, "XLA-compile the batch-1 paths of every model alike (on a CPU "
                  "it speeds RANet up and slows VGG16 down: BUILD_NOTES.md).")
flags.DEFINE_integer("intra_op_threads", 0, "Threads one op may use; 0: every core. 1 "
                     "suits batch-1 latency of small networks (BUILD_NOTES.md).", lower_bound=0)
flags.DEFINE_integer("inter_op_threads", 0, "Ops run at once; 0: every core.", lower_bound=0)
flags.DEFINE_integer("latency_images", 200, "Images timed one by one.")
flags.DEFINE_list("batch_sizes", ["1", "8", "64", "256"], "Batch sizes of the throughput sweep.")
flags.DEFINE_integer("throughput_images", 1024, "Images per throughput measurement.")
flags.DEFINE_string("json", None, "Also write the results here.")


def _targets(models, expected_macs, latency_ms, throughput) -> list:
    """The performance targets of issue 5, as measured ratios (higher is better)."""
    rows = []
    baselines = {m.name: latency_ms[m.name]["full"]["p50"] for m in models
                 if m.model.num_exits == 1}
    for m in models:
        if m.model.num_exits == 1:
            continue
        adaptive_p50 = latency_ms[m.name]["adaptive"]["p50"]
        rows.append((f"{m.name}: keras_predict / adaptive (batch 1)",
                     latency_ms[m.name]["keras_predict"]["p50"] / adaptive_p50, 20.0))
        for name, p50 in baselines.items():
            target = 6.0 if "resnet" in name else 3.0
            rows.append((f"{name} full / {m.name} adaptive (batch 1)", p50 / adaptive_p50, target))
        largest = max(throughput[m.name])
        measured = throughput[m.name][largest]
        saving = m.cost.exits[-1].macs / expected_macs[m.name]
        rows.append((f"{m.name}: adaptive / full throughput at batch {largest} "
                     f"(MAC saving {saving:.2f}x)", measured["adaptive"] / measured["full"],
                     0.8 * saving))
    return rows


def main(argv):
    if len(argv) > 1:
        raise ValueError(f"unexpected arguments: {' '.join(argv[1:])}")
    if not FLAGS.model_dir:
        raise ValueError("pass at least one --model_dir (repeat it to compare models)")
    batch_sizes = sorted({int(b) for b in FLAGS.batch_sizes})
    from ranet import adaptive, evaluation, latency, runtime
    runtime.configure_threads(FLAGS.intra_op_threads, FLAGS.inter_op_threads)
    logging.set_verbosity(logging.INFO)

    models = evaluation.load_models(FLAGS.model_dir)
    images = evaluation.load_images(models, FLAGS.split, data_dir=FLAGS.data_dir)
    batch1, batched, expected_macs, operating_points = {}, {}, {}, {}
    for m in models:
        result = evaluation.evaluate_model(m.model, m.cost, images, name=m.name,
                                           model_dir=m.model_dir, checkpoint=m.checkpoint)
        # Only the default operating point: the one the targets are stated for.
        thresholds = {k: v for k, v in result.thresholds_by_path.items() if k == "adaptive"}
        expected_macs[m.name] = (result.default.point.expected_macs if result.default
                                 else m.cost.exits[-1].macs)
        if result.default:
            operating_points[m.name] = {"last_exit_accuracy": result.exit_accuracy[-1],
                                        **result.default.to_json()}
        predictor = adaptive.AdaptivePredictor(m.model, jit_compile=FLAGS.xla)
        batch1[m.name] = latency.batch1_paths(m.model, predictor, thresholds, FLAGS.xla)
        batched[m.name] = latency.batched_paths(m.model, predictor, thresholds)

    timed = images.report_images[:FLAGS.latency_images]
    logging.info("timing batch 1 on %d images, every path interleaved", len(timed))
    stats = latency.measure_latency(batch1, timed)
    latency_ms = {name: {p: s.to_json() for p, s in paths.items()} for name, paths in stats.items()}
    throughput = {}
    for name, paths in batched.items():
        throughput[name] = {}
        for batch_size in batch_sizes:
            logging.info("%s: throughput at batch %d", name, batch_size)
            sample = images.report_images[:max(FLAGS.throughput_images, batch_size)]
            throughput[name][batch_size] = {
                path: latency.measure_throughput(fn, sample, batch_size)
                for path, fn in paths.items()}

    environment = latency.device_info()
    print(f"\n{environment['device']}; TensorFlow {environment['tensorflow']}; "
          f"XLA {'on' if FLAGS.xla else 'off'} (batch-1 paths)\n")
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
    for name, by_batch in throughput.items():
        for path in by_batch[batch_sizes[0]]:
            print(f"{name:<28} {path:<14} "
                  + " ".join(f"{by_batch[b][path]:>9.0f}" for b in batch_sizes))
    targets = _targets(models, expected_macs, latency_ms, throughput)
    print(f"\n{'target':<70} {'measured':>9} {'needed':>7}")
    for label, measured, needed in targets:
        print(f"{label:<70} {measured:>8.1f}x {needed:>6.1f}x "
              f"{'ok' if measured >= needed else 'MISSED'}")
    if FLAGS.json:
        with open(FLAGS.json, "w") as f:
            json.dump({"environment": environment, "xla": FLAGS.xla,
                       "operating_points": operating_points,
                       "latency_ms": latency_ms, "throughput_ips": throughput,
                       "targets": [{"target": label, "measured": measured, "needed": needed}
                                   for label, measured, needed in targets]}, f, indent=2)


def run():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    cli.run(main)


if __name__ == "__main__":
    run()

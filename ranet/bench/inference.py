"""Inference benchmark: every model on every runtime, batch 1 and batched, and the targets.

    python -m ranet.bench.inference --model_dir=runs/ranet --model_dir=runs/vgg16 \\
        --model_dir=runs/resnet50 --runtimes=tf,litert,litert_int8 --json=bench_inference.json \\
        --tf_settings=default,xla,one_thread,one_thread_xla,bfloat16,one_thread_bfloat16

Every model runs the same kind of paths on the same images, timed interleaved in one process
(``ranet.inference.comparison``), on each runtime of ``--runtimes``. TensorFlow's thread
pools can only be sized before its first op, so each other ``--tf_settings`` entry is timed
by a child process of this binary (TensorFlow only, run before the main measurement, one at
a time) and its numbers join the table: the TF path at its best next to its defaults. It
prints the latency table, throughput per batch size, and the performance targets as
measured ratios (benchmarks print numbers; nothing here is a timed test).
"""

import dataclasses
import os
import subprocess
import sys
import tempfile
from typing import Dict, List, Optional, Tuple

from absl import flags, logging

from ranet import cli, jsonio
from ranet.inference import comparison, latency
from ranet.inference.comparison import ComparisonOptions

# TensorFlow settings: (intra-op threads, inter-op threads, XLA, precision) of the batch-1
# paths. bfloat16 runs the convolutions on the AMX units of CPUs that have them (oneDNN).
TF_SETTINGS = {"default": (0, 0, False, "fp32"), "xla": (0, 0, True, "fp32"),
               "one_thread": (1, 2, False, "fp32"), "one_thread_xla": (1, 2, True, "fp32"),
               "bfloat16": (0, 0, False, "mixed_bfloat16"),
               "one_thread_bfloat16": (1, 2, False, "mixed_bfloat16")}
# Batch-1 speed-ups RANet's adaptive path must reach over each baseline's full pass (by the
# baseline's architecture): on each one's fastest runtime within 1 point of its fp32
# accuracy, and on LiteRT fp32 against LiteRT fp32.
BEST_AGAINST_BEST = {"vgg16": 2.0, "resnet50": 6.0}
SAME_RUNTIME_FP32 = {"vgg16": 3.0, "resnet50": 8.0}
# RANet's LiteRT adaptive path against its TensorFlow one, and the reference's PyTorch full pass.
LITERT_OVER_TF = 4.0
LITERT_OVER_PYTORCH = 10.0
# RANet's full pass on LiteRT fp32 reaches this share of VGG16's multiply-adds per second.
FULL_PASS_MAC_RATE_SHARE = 0.4
# Batched: the adaptive path's throughput gain reaches the multiply-add saving within this.
BATCHED_SAVING_SHARE = 0.8
# "Within 1 point": the accuracy a faster runtime or precision may lose.
ACCURACY_TOLERANCE = 0.01


def define_flags(values: flags.FlagValues) -> None:
    cli.define_fields(ComparisonOptions, values)
    for name, default in (("split", "validation"), ("latency_images", 200),
                          ("throughput_images", 1024)):
        values.set_default(name, default)
    define = {"flag_values": values}
    flags.DEFINE_list("batch_sizes", ["1", "8", "64", "256"],
                      "Batch sizes of the TensorFlow throughput sweep.", **define)
    flags.DEFINE_list("tf_settings", ["default"], "TensorFlow settings to time: "
                      f"{', '.join(TF_SETTINGS)}; all but the run's own in child processes.",
                      **define)
    flags.DEFINE_float("pytorch_full_ms", None, "Batch-1 p50 of the reference PyTorch RANet's "
                       "full pass on this machine (BUILD_NOTES.md says how it is measured): "
                       "the ratio LiteRT adaptive must beat.", **define)
    flags.DEFINE_string("json", None, "Also write the results here.", **define)


def _p50(result: comparison.Comparison, runtime: str, model: str, path: str) -> Optional[float]:
    by_model = result.results.get(runtime, {})
    stats = by_model[model].latency.get(path) if model in by_model else None
    return None if stats is None else stats.p50


def _headline_accuracy(evaluation) -> float:
    """Accuracy of the path compared: RANet's adaptive default point, a baseline's full pass."""
    if not evaluation.is_adaptive:
        return evaluation.exit_accuracy[-1]
    return evaluation.default.point.accuracy


def _headline_path(evaluation) -> str:
    return latency.ADAPTIVE if evaluation.is_adaptive else latency.FULL


def best_runtimes(result: comparison.Comparison, tf_settings: Dict[str, dict],
                  tf_accuracy: Dict[str, Dict[str, float]]) -> Dict[str, Tuple[str, float, float]]:
    """Per model, its fastest (runtime, p50, accuracy) whose accuracy is within 1 point of fp32.

    The path is RANet's adaptive default point, a baseline's full pass. TensorFlow counts
    with every setting timed (``tf_settings``: setting -> model -> p50 of each path;
    ``tf_accuracy``: setting -> model -> accuracy of the path, which bfloat16 changes).
    """
    best = {}
    for loaded in result.models:
        reference = result.results[comparison.TF][loaded.name].evaluation
        path = _headline_path(reference)
        fp32_accuracy = _headline_accuracy(reference)
        candidates = [(f"tf ({setting})", by_model[loaded.name][path],
                       tf_accuracy[setting][loaded.name])
                      for setting, by_model in tf_settings.items()
                      if tf_accuracy[setting][loaded.name] >= fp32_accuracy - ACCURACY_TOLERANCE]
        for runtime, by_model in result.results.items():
            accuracy = _headline_accuracy(by_model[loaded.name].evaluation)
            if runtime != comparison.TF and accuracy >= fp32_accuracy - ACCURACY_TOLERANCE:
                candidates.append((runtime, _p50(result, runtime, loaded.name, path), accuracy))
        best[loaded.name] = min(candidates, key=lambda candidate: candidate[1])
    return best


def targets(result: comparison.Comparison, tf_settings: Dict[str, dict],
            tf_accuracy: Dict[str, Dict[str, float]],
            pytorch_full_ms: Optional[float]) -> List[Tuple[str, float, float, str]]:
    """The performance targets as (label, measured, needed, unit): met when measured >= needed.

    Units: "x" for a ratio (of latencies, throughputs or rates), "points" for an accuracy
    difference in percentage points.
    """
    rows = []
    best = best_runtimes(result, tf_settings, tf_accuracy)
    baselines = [(m.name, m.config.model.name) for m in result.models if m.model.num_exits == 1]
    litert = "litert" in result.results
    for loaded in result.models:
        evaluation = result.results[comparison.TF][loaded.name].evaluation
        if not evaluation.is_adaptive:
            continue
        name = loaded.name
        for baseline, architecture in baselines:
            if architecture in BEST_AGAINST_BEST:
                rows.append((f"best: {baseline} ({best[baseline][0]}) / {name} adaptive "
                             f"({best[name][0]})", best[baseline][1] / best[name][1],
                             BEST_AGAINST_BEST[architecture], "x"))
            if litert and architecture in SAME_RUNTIME_FP32:
                rows.append((f"litert: {baseline} full / {name} adaptive",
                             _p50(result, "litert", baseline, latency.FULL)
                             / _p50(result, "litert", name, latency.ADAPTIVE),
                             SAME_RUNTIME_FP32[architecture], "x"))
        if litert:
            litert_adaptive = _p50(result, "litert", name, latency.ADAPTIVE)
            rows.append((f"{name}: tf adaptive / litert adaptive",
                         _p50(result, comparison.TF, name, latency.ADAPTIVE) / litert_adaptive,
                         LITERT_OVER_TF, "x"))
            if pytorch_full_ms:
                rows.append((f"{name}: reference PyTorch full / litert adaptive",
                             pytorch_full_ms / litert_adaptive, LITERT_OVER_PYTORCH, "x"))
            for baseline, architecture in baselines:
                if architecture == "vgg16":
                    vgg = next(m for m in result.models if m.name == baseline)
                    rate = loaded.cost.exits[-1].macs / _p50(result, "litert", name, "full")
                    vgg_rate = vgg.cost.exits[-1].macs / _p50(result, "litert", baseline, "full")
                    rows.append((f"litert full pass MAC/s: {name} / {baseline}", rate / vgg_rate,
                                 FULL_PASS_MAC_RATE_SHARE, "x"))
        # Batched: at batch 64 or more, on whichever runtime delivers more adaptive images/s
        # there (LiteRT's stage files take one image at a time, so today TensorFlow).
        saving = loaded.cost.exits[-1].macs / evaluation.default.point.expected_macs
        batched = [(runtime, batch, by_path) for runtime, by_model in result.results.items()
                   for batch, by_path in by_model[name].throughput.items() if batch >= 64]
        if batched:
            runtime, batch, by_path = max(batched, key=lambda entry: entry[2][latency.ADAPTIVE])
            rows.append((f"{name}: adaptive / full images/s, {runtime} batch {batch} "
                         f"(MAC saving {saving:.2f}x)",
                         by_path[latency.ADAPTIVE] / by_path[latency.FULL],
                         BATCHED_SAVING_SHARE * saving, "x"))
    if "litert_int8" in result.results:
        for loaded in result.models:
            fp32 = result.results[comparison.TF][loaded.name].evaluation.exit_accuracy
            int8 = result.results["litert_int8"][loaded.name].evaluation.exit_accuracy
            rows.append((f"{loaded.name}: int8 - fp32 accuracy, worst exit",
                         100 * min(i - f for i, f in zip(int8, fp32)),
                         -100 * ACCURACY_TOLERANCE, "points"))
            rows.append((f"{loaded.name}: litert full, fp32 / int8 latency",
                         _p50(result, "litert", loaded.name, latency.FULL)
                         / _p50(result, "litert_int8", loaded.name, latency.FULL), 1.0, "x"))
    return rows


def _tf_setting(options: ComparisonOptions) -> str:
    """The name of the TensorFlow setting ``options`` runs with (or a description)."""
    own = (options.intra_op_threads, options.inter_op_threads, options.xla, options.precision)
    return next((name for name, setting in TF_SETTINGS.items() if setting == own),
                f"intra {own[0]}, inter {own[1]}{', xla' if own[2] else ''}, {own[3]}")


def _time_tf_setting(setting: str, options: ComparisonOptions
                     ) -> Tuple[Dict[str, Dict[str, float]], Dict[str, float]]:
    """TensorFlow batch-1 p50 of every path of every model, in a child process, and the
    accuracy of each model's compared path there."""
    intra, inter, xla, precision = TF_SETTINGS[setting]
    child_options = dataclasses.replace(options, intra_op_threads=intra, inter_op_threads=inter,
                                        xla=xla, precision=precision, runtimes=(comparison.TF,),
                                        throughput_images=1)
    with tempfile.TemporaryDirectory(prefix="ranet_bench_") as scratch:
        output = os.path.join(scratch, "tf.json")
        command = [sys.executable, "-m", "ranet.bench.inference", *cli.to_flags(child_options),
                   "--tf_settings=", "--batch_sizes=1", f"--json={output}"]
        logging.info("timing TensorFlow (%s) in a child process", setting)
        child = subprocess.run(command, capture_output=True, text=True)
        if child.returncode != 0:
            raise RuntimeError(f"the child timing TensorFlow ({setting}) failed:\n"
                               f"{child.stderr[-3000:]}")
        timed = jsonio.read(output, "It is this benchmark's own scratch file.")
    points = timed["operating_points"][comparison.TF]
    accuracy = {model: points[model]["accuracy"] if model in points else exits[-1]
                for model, exits in timed["exit_accuracy"][comparison.TF].items()}
    return ({model: {path: stats["p50"] for path, stats in paths.items()}
             for model, paths in timed["latency_ms"][comparison.TF].items()}, accuracy)


def main(values: flags.FlagValues) -> dict:
    options = cli.from_flags(ComparisonOptions, values)
    try:
        batch_sizes = sorted({int(b) for b in values.batch_sizes})
    except ValueError:
        raise ValueError("--batch_sizes takes comma-separated integers. "
                         f"Received: --batch_sizes={','.join(values.batch_sizes)}") from None
    unknown = [s for s in values.tf_settings if s and s not in TF_SETTINGS]
    if unknown:
        raise ValueError(f"tf_settings must be some of {', '.join(TF_SETTINGS)}. "
                         f"Received: tf_settings={','.join(values.tf_settings)}")
    own_setting = _tf_setting(options)
    # The children run first, each alone, so that nothing else runs beside any timing.
    children = {setting: _time_tf_setting(setting, options)
                for setting in values.tf_settings if setting and setting != own_setting}
    tf_settings = {setting: p50 for setting, (p50, _) in children.items()}
    tf_accuracy = {setting: accuracy for setting, (_, accuracy) in children.items()}
    result = comparison.compare(options, throughput_batch_sizes=batch_sizes)[0]
    tf_results = result.results[comparison.TF]
    tf_settings[own_setting] = {
        model: {path: stats.p50 for path, stats in measured.latency.items()}
        for model, measured in tf_results.items()}
    tf_accuracy[own_setting] = {model: _headline_accuracy(measured.evaluation)
                                for model, measured in tf_results.items()}
    rows = targets(result, tf_settings, tf_accuracy, values.pytorch_full_ms)
    operating_points = {
        runtime: {model: {"last_exit_accuracy": measured.evaluation.exit_accuracy[-1],
                          **measured.evaluation.default.to_json()}
                  for model, measured in by_model.items() if measured.evaluation.is_adaptive}
        for runtime, by_model in result.results.items()}
    latency_ms = {runtime: {model: {path: stats.to_json()
                                    for path, stats in measured.latency.items()}
                            for model, measured in by_model.items()}
                  for runtime, by_model in result.results.items()}
    throughput = {runtime: {model: measured.throughput for model, measured in by_model.items()}
                  for runtime, by_model in result.results.items()}
    _print(result, throughput, operating_points, tf_settings, tf_accuracy, rows, options)
    output = {"environment": latency.device_info(), "xla": options.xla,
              "litert_threads": comparison.litert_threads(options),
              "operating_points": operating_points, "latency_ms": latency_ms,
              "tf_settings_p50_ms": tf_settings, "tf_settings_accuracy": tf_accuracy,
              "best": best_runtimes(result, tf_settings, tf_accuracy),
              "throughput_ips": throughput,
              "exit_accuracy": {runtime: {model: measured.evaluation.exit_accuracy
                                          for model, measured in by_model.items()}
                                for runtime, by_model in result.results.items()},
              "targets": [{"target": label, "measured": measured, "needed": needed,
                           "unit": unit} for label, measured, needed, unit in rows]}
    if values.json:
        jsonio.write(values.json, output)
    return output


def _print(result, throughput, operating_points, tf_settings, tf_accuracy, rows,
           options) -> None:
    environment = latency.device_info()
    print(f"\n{environment['device']}; TensorFlow {environment['tensorflow']}; XLA "
          f"{'on' if options.xla else 'off'} (batch-1 paths); LiteRT "
          f"{comparison.litert_threads(options)} threads\n")
    for runtime, points in operating_points.items():
        for name, point in points.items():
            print(f"{name} ({runtime}): default operating point {point['accuracy']:.2%} "
                  f"(every exit: {point['last_exit_accuracy']:.2%}), "
                  f"{point['expected_macs'] / 1e6:.2f} M multiply-adds expected, exit "
                  "fractions " + ", ".join(f"{f:.3f}" for f in point["exit_fractions"]))
    print(f"\n{'model':<24} {'runtime':<12} {'path':<14} {'p50 ms':>8} {'p90 ms':>8} "
          f"{'p99 ms':>8}")
    for runtime, by_model in result.results.items():
        for name, measured in by_model.items():
            for path, s in measured.latency.items():
                print(f"{name:<24} {runtime:<12} {path:<14} {s.p50:>8.2f} {s.p90:>8.2f} "
                      f"{s.p99:>8.2f}")
    settings = list(tf_settings)
    print(f"\nTensorFlow p50 ms by setting\n{'model':<24} {'path':<14} "
          + " ".join(f"{s:>15}" for s in settings))
    for name, paths in next(iter(tf_settings.values())).items():
        for path in paths:
            print(f"{name:<24} {path:<14} " + " ".join(
                f"{tf_settings[s][name][path]:>15.2f}" for s in settings))
        print(f"{name:<24} {'accuracy':<14} " + " ".join(
            f"{tf_accuracy[s][name]:>15.2%}" for s in settings))
    # LiteRT is measured at batch 1 only, whatever --batch_sizes says.
    batch_sizes = sorted({b for by_model in throughput.values()
                          for by_batch in by_model.values() for b in by_batch})
    print(f"\n{'model':<24} {'runtime':<12} {'path':<14} "
          + " ".join(f"{f'b={b}':>9}" for b in batch_sizes) + "   (images/s)")
    for runtime, by_model in throughput.items():
        for name, by_batch in by_model.items():
            for path in next(iter(by_batch.values())):
                print(f"{name:<24} {runtime:<12} {path:<14} " + " ".join(
                    f"{by_batch[b][path]:>9.0f}" if b in by_batch else f"{'':>9}"
                    for b in batch_sizes))
    print(f"\n{'target':<78} {'measured':>9} {'needed':>9}")
    for label, measured, needed, unit in rows:
        mark = "x" if unit == "x" else " pt"
        print(f"{label:<78} {measured:>7.2f}{mark:<2} {needed:>7.2f}{mark:<2} "
              f"{'ok' if measured >= needed else 'MISSED'}")


def run() -> None:
    cli.run(main, define_flags)


if __name__ == "__main__":
    run()

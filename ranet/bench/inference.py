"""Inference benchmark: every model on every runtime, batch 1 and batched, and the targets.

    python -m ranet.bench.inference --model_dir=runs/ranet --model_dir=runs/vgg16 \\
        --model_dir=runs/resnet50 --runtimes=tf,litert,litert_int8 --json=bench_inference.json \\
        --tf_settings=default,xla,one_thread,one_thread_xla,bfloat16,one_thread_bfloat16

Every model runs the same kind of paths on the same images, timed interleaved in one process
(``ranet.inference.comparison``), on each runtime of ``--runtimes``. TensorFlow's thread
pools can only be sized before its first op, so each other ``--tf_settings`` entry is timed
by a child process of this binary (TensorFlow only, run before the main measurement, one at
a time) and its numbers join the table: the TF path at its best next to its defaults. It
prints the latency table, throughput per batch size, and the performance targets
(``TARGETS``) as measured ratios (benchmarks print numbers; nothing here is a timed test).
``--json`` writes what ``ranet.eval`` writes as report.json (``report.build``) and beside it
the benchmark's own: each TensorFlow setting's p50 and accuracy, each model's best runtime,
images/s at every batch size, the PyTorch anchor and the targets.
"""

import dataclasses
import os
import subprocess
import sys
import tempfile
from typing import Callable, Dict, List, NamedTuple, Optional, Tuple

from absl import flags, logging

from ranet import cli, jsonio
from ranet.errors import UsageError
from ranet.inference import comparison, points, report
from ranet.inference.comparison import ComparisonOptions
from ranet.inference.evaluation import ModelEvaluation
from ranet.inference.points import PointId
from ranet.training.model_dir import LoadedModel

# TensorFlow settings: (intra-op threads, inter-op threads, XLA, precision) of the batch-1
# paths. bfloat16 runs the convolutions on the AMX units of CPUs that have them (oneDNN).
TF_SETTINGS = {"default": (0, 0, False, "fp32"), "xla": (0, 0, True, "fp32"),
               "one_thread": (1, 2, False, "fp32"), "one_thread_xla": (1, 2, True, "fp32"),
               "bfloat16": (0, 0, False, "mixed_bfloat16"),
               "one_thread_bfloat16": (1, 2, False, "mixed_bfloat16")}
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


def compared_path(evaluation: ModelEvaluation) -> Tuple[PointId, float]:
    """The path a model is compared by, and its accuracy: a model with exits, its adaptive
    path at its default point; a baseline, its full pass."""
    if evaluation.is_adaptive:
        return points.DEFAULT, evaluation.default.point.accuracy
    return points.FULL, evaluation.exit_accuracy[-1]


def _p50(result: comparison.Comparison, runtime: str, model: str,
         path: PointId) -> Optional[float]:
    """None where the runtime or the path was not measured."""
    measured = result.results.get(runtime, {}).get(model)
    stats = None if measured is None else measured.latency.get(path)
    return None if stats is None else stats.p50


def _ratio(numerator: Optional[float], denominator: Optional[float]) -> Optional[float]:
    return None if numerator is None or denominator is None else numerator / denominator


def best_runtimes(result: comparison.Comparison, tf_settings: Dict[str, dict],
                  tf_accuracy: Dict[str, Dict[str, float]]) -> Dict[str, Tuple[str, float, float]]:
    """Per model, its fastest (runtime, p50, accuracy) on its ``compared_path`` whose accuracy
    is within 1 point of fp32 TensorFlow's.

    TensorFlow counts with every setting timed (``tf_settings``: setting -> model -> p50 of
    each path by its name; ``tf_accuracy``: setting -> model -> accuracy of the path, which bfloat16
    changes).
    """
    best = {}
    for loaded in result.models:
        name = loaded.name
        path, fp32_accuracy = compared_path(result.results[comparison.TF][name].evaluation)
        candidates = [(f"tf ({setting})", by_model[name][path.path],
                       tf_accuracy[setting][name])
                      for setting, by_model in tf_settings.items()]
        candidates += [(runtime, _p50(result, runtime, name, path),
                        compared_path(by_model[name].evaluation)[1])
                       for runtime, by_model in result.results.items()
                       if runtime != comparison.TF]
        best[name] = min((c for c in candidates if c[2] >= fp32_accuracy - ACCURACY_TOLERANCE),
                         key=lambda candidate: candidate[1])
    return best


@dataclasses.dataclass(frozen=True)
class _Measurements:
    """What the targets are worked out from."""
    result: comparison.Comparison
    best: Dict[str, Tuple[str, float, float]]
    pytorch_full_ms: Optional[float]


# (measurements, model, its baseline or None) -> (the measured value, None where the run
# lacks what it needs; the fields the target's label names beyond model and baseline).
Measure = Callable[[_Measurements, LoadedModel, Optional[LoadedModel]],
                   Tuple[Optional[float], Dict[str, object]]]


class _P50(NamedTuple):
    """A batch-1 p50 a latency ratio takes: of the row's model, or of its baseline."""
    runtime: str
    path: PointId
    of_baseline: bool = False


def _latency_ratio(numerator: _P50, denominator: _P50) -> Measure:
    def measure(measurements, model, baseline):
        return _ratio(*(_p50(measurements.result, p.runtime,
                             (baseline if p.of_baseline else model).name, p.path)
                        for p in (numerator, denominator))), {}
    return measure


def _best_over_best(measurements, model, baseline):
    """The baseline's p50 over the model's, each on its own ``best_runtimes`` entry."""
    baseline_runtime, baseline_p50, _ = measurements.best[baseline.name]
    runtime, p50, _ = measurements.best[model.name]
    return baseline_p50 / p50, {"baseline_runtime": baseline_runtime, "runtime": runtime}


def _pytorch_over_litert(measurements, model, _):
    return _ratio(measurements.pytorch_full_ms,
                  _p50(measurements.result, "litert", model.name, points.DEFAULT)), {}


def _full_pass_mac_rate_share(measurements, model, baseline):
    """The model's full-pass multiply-adds per second on LiteRT fp32 over the baseline's."""
    rates = [_ratio(m.cost.exits[-1].macs,
                    _p50(measurements.result, "litert", m.name, points.FULL))
             for m in (model, baseline)]
    return _ratio(*rates), {}


def _batched_gain(measurements, model, _):
    """Adaptive over full images/s at batch 64 or more, on whichever runtime delivers more
    adaptive images/s there (LiteRT's stage files take one image at a time, so today
    TensorFlow), with the multiply-add saving of the default point it is held to."""
    batched = [(runtime, batch, by_path)
               for runtime, by_model in measurements.result.results.items()
               for batch, by_path in by_model[model.name].throughput.items() if batch >= 64]
    if not batched:
        return None, {}
    runtime, batch, by_path = max(batched, key=lambda entry: entry[2][points.DEFAULT])
    default = measurements.result.results[comparison.TF][model.name].evaluation.default
    saving = model.cost.exits[-1].macs / default.point.expected_macs
    return (by_path[points.DEFAULT] / by_path[points.FULL],
            {"runtime": runtime, "batch": batch, "saving": saving})


def _int8_accuracy_change(measurements, model, _):
    """Percentage points int8 LiteRT gains over fp32 TensorFlow at its worst exit."""
    results = measurements.result.results
    if "litert_int8" not in results:
        return None, {}
    fp32 = results[comparison.TF][model.name].evaluation.exit_accuracy
    int8 = results["litert_int8"][model.name].evaluation.exit_accuracy
    return 100 * min(i - f for i, f in zip(int8, fp32)), {}


@dataclasses.dataclass(frozen=True)
class Target:
    """A performance target: met where the measured value reaches ``needed``.

    It has a row for each adaptive model (RANet), or for every model with ``every_model``;
    with ``baseline`` (an architecture), one for each such model and each baseline of that
    architecture in the run. ``label`` is a ``str.format`` template of ``model``,
    ``baseline`` and the fields ``measure`` gives; ``needed_times`` names the field that
    ``needed`` is a share of. Units: "x" for a ratio (of latencies, throughputs or rates),
    "points" for an accuracy difference in percentage points.
    """
    label: str
    measure: Measure
    needed: float
    unit: str = "x"
    baseline: Optional[str] = None
    every_model: bool = False
    needed_times: Optional[str] = None


_BEST = "best: {baseline} ({baseline_runtime}) / {model} adaptive ({runtime})"
_LITERT = "litert: {baseline} full / {model} adaptive"
_LITERT_ADAPTIVE = _P50("litert", points.DEFAULT)
_LITERT_BASELINE_FULL = _P50("litert", points.FULL, of_baseline=True)
TARGETS = (
    # Batch-1 speed-ups RANet's adaptive path must reach over each baseline's full pass: on
    # each one's fastest runtime within 1 point of its fp32 accuracy, and on LiteRT fp32
    # against LiteRT fp32.
    Target(_BEST, _best_over_best, 2.0, baseline="vgg16"),
    Target(_BEST, _best_over_best, 6.0, baseline="resnet50"),
    Target(_LITERT, _latency_ratio(_LITERT_BASELINE_FULL, _LITERT_ADAPTIVE), 3.0,
           baseline="vgg16"),
    Target(_LITERT, _latency_ratio(_LITERT_BASELINE_FULL, _LITERT_ADAPTIVE), 8.0,
           baseline="resnet50"),
    # RANet's LiteRT adaptive path against its TensorFlow one, and the reference's PyTorch
    # full pass (--pytorch_full_ms).
    Target("{model}: tf adaptive / litert adaptive",
           _latency_ratio(_P50(comparison.TF, points.DEFAULT), _LITERT_ADAPTIVE), 4.0),
    Target("{model}: reference PyTorch full / litert adaptive", _pytorch_over_litert, 10.0),
    Target("litert full pass MAC/s: {model} / {baseline}", _full_pass_mac_rate_share, 0.4,
           baseline="vgg16"),
    # Batched, the adaptive path's throughput gain is most of its multiply-add saving.
    Target("{model}: adaptive / full images/s, {runtime} batch {batch} "
           "(MAC saving {saving:.2f}x)", _batched_gain, 0.8, needed_times="saving"),
    # int8 may cost at most the tolerance at any exit, and must not be slower than fp32.
    Target("{model}: int8 - fp32 accuracy, worst exit", _int8_accuracy_change,
           -100 * ACCURACY_TOLERANCE, unit="points", every_model=True),
    Target("{model}: litert full, fp32 / int8 latency",
           _latency_ratio(_P50("litert", points.FULL), _P50("litert_int8", points.FULL)),
           1.0, every_model=True),
)


def _rows_of(target: Target, models: List[LoadedModel]
             ) -> List[Tuple[LoadedModel, Optional[LoadedModel]]]:
    """(model, baseline) of each row ``target`` has among ``models``."""
    subjects = [m for m in models if target.every_model or m.model.num_exits > 1]
    if target.baseline is None:
        return [(m, None) for m in subjects]
    baselines = [m for m in models
                 if m.model.num_exits == 1 and m.config.model.name == target.baseline]
    return [(m, baseline) for m in subjects for baseline in baselines]


def targets(result: comparison.Comparison, best: Dict[str, Tuple[str, float, float]],
            pytorch_full_ms: Optional[float]) -> List[dict]:
    """Every row of every one of ``TARGETS`` the run can measure, as {target, measured,
    needed, unit}; ``best``: ``best_runtimes``."""
    measurements = _Measurements(result, best, pytorch_full_ms)
    rows = []
    for target in TARGETS:
        for model, baseline in _rows_of(target, result.models):
            measured, fields = target.measure(measurements, model, baseline)
            if measured is None:
                continue
            label = target.label.format(model=model.name,
                                        baseline=baseline.name if baseline else None, **fields)
            scale = fields[target.needed_times] if target.needed_times else 1.0
            rows.append({"target": label, "measured": measured,
                         "needed": scale * target.needed, "unit": target.unit})
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
    # The child times only its own setting, the one asked for.
    return timed["tf_settings_p50_ms"][setting], timed["tf_settings_accuracy"][setting]


def main(values: flags.FlagValues) -> dict:
    options = cli.from_flags(ComparisonOptions, values)
    try:
        batch_sizes = sorted({int(b) for b in values.batch_sizes})
    except ValueError:
        raise UsageError("--batch_sizes takes comma-separated integers. "
                         f"Received: --batch_sizes={','.join(values.batch_sizes)}") from None
    unknown = [s for s in values.tf_settings if s and s not in TF_SETTINGS]
    if unknown:
        raise UsageError(f"tf_settings must be some of {', '.join(TF_SETTINGS)}. "
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
        model: {path.path: stats.p50 for path, stats in measured.latency.items()}
        for model, measured in tf_results.items()}
    tf_accuracy[own_setting] = {model: compared_path(measured.evaluation)[1]
                                for model, measured in tf_results.items()}
    best = best_runtimes(result, tf_settings, tf_accuracy)
    output = {**report.build(result),
              "tf_settings_p50_ms": tf_settings, "tf_settings_accuracy": tf_accuracy,
              "best": best,
              # The report holds images/s at --batch_size only.
              "throughput_ips_by_batch": {
                  runtime: {model: {batch: {path.path: ips for path, ips in by_path.items()}
                                    for batch, by_path in measured.throughput.items()}
                            for model, measured in by_model.items()}
                  for runtime, by_model in result.results.items()},
              "pytorch_full_ms": values.pytorch_full_ms,
              "targets": targets(result, best, values.pytorch_full_ms)}
    _print(result, output)
    if values.json:
        jsonio.write(values.json, output)
    return output


def _print(result: comparison.Comparison, output: dict) -> None:
    """The comparison's own numbers from ``result``; the benchmark's from ``output``."""
    print(f"\n{output['device']}; TensorFlow {output['tensorflow']}; XLA "
          f"{'on' if result.options.xla else 'off'} (batch-1 paths); LiteRT "
          f"{output['litert_threads']} threads\n")
    for runtime, by_model in result.results.items():
        for name, measured in by_model.items():
            default, evaluation = measured.evaluation.default, measured.evaluation
            if default is not None:
                print(f"{name} ({runtime}): default operating point "
                      f"{default.point.accuracy:.2%} (every exit: "
                      f"{evaluation.exit_accuracy[-1]:.2%}), "
                      f"{default.point.expected_macs / 1e6:.2f} M multiply-adds expected, exit "
                      "fractions " + ", ".join(f"{f:.3f}" for f in default.point.exit_fractions))
    print("\nBatch-1 latency (ms)\n" + "\n".join(report.latency_table(result, throughput=False)))
    tf_settings, tf_accuracy = output["tf_settings_p50_ms"], output["tf_settings_accuracy"]
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
    throughput = output["throughput_ips_by_batch"]
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
    for row in output["targets"]:
        mark = "x" if row["unit"] == "x" else " pt"
        print(f"{row['target']:<78} {row['measured']:>7.2f}{mark:<2} {row['needed']:>7.2f}"
              f"{mark:<2} {'ok' if row['measured'] >= row['needed'] else 'MISSED'}")


def run() -> None:
    cli.run(main, define_flags)


if __name__ == "__main__":
    run()

"""Renders a ``comparison.Comparison``: report.json, report.md, PNG plots and TensorBoard.

Every renderer takes the typed comparison; report.json is written at the edge, never read
back. Its shape is symmetric: each model holds one view per runtime, with the same keys
(``models[i]["runtimes"]["tf"]`` is TensorFlow's), and runtimes come in one canonical order
whatever the order of ``--runtimes``.
"""

import math
import os
from typing import Dict, Iterator, List, Optional, Tuple

import tensorflow as tf

from ranet import devices, jsonio
from ranet.inference import equal_accuracy, latency, points
from ranet.inference.comparison import Comparison, ModelResult, litert_threads
from ranet.inference.evaluation import BudgetedResult
from ranet.inference.points import Kind, PointId

REPORT_JSON = "report.json"
REPORT_MD = "report.md"
PLOT_MACS = "accuracy_vs_macs.png"
PLOT_LATENCY = "accuracy_vs_latency.png"


def report_dirs(report_dir: str, latency_blocks) -> Dict[int, str]:
    """Where the report of each latency block goes: ``report_dir`` itself for one block,
    ``report_dir/latency_block<N>`` for each of several."""
    blocks = list(latency_blocks)
    if len(blocks) == 1:
        return {blocks[0]: report_dir}
    return {block: os.path.join(report_dir, f"latency_block{block}") for block in blocks}


def _throughput(comparison: Comparison, result: ModelResult) -> Dict[PointId, float]:
    """Images/s of each path at the report's batch size (LiteRT: one image at a time)."""
    by_batch = result.throughput
    return by_batch.get(comparison.options.batch_size, by_batch.get(1, {}))


def build(comparison: Comparison) -> dict:
    """The report.json content of ``comparison``."""
    options, images = comparison.options, comparison.images
    environment = devices.device_info()
    return {
        "split": images.report_name, "calibration_split": images.calibration_name,
        "adaptive_model": comparison.adaptive_model,
        "at_equal_accuracy": _at_equal_accuracy(comparison),
        "num_images": len(images.report_labels), "device": environment["device"],
        "tensorflow": environment["tensorflow"], "environment": environment,
        "precision": options.precision, "xla": options.xla, "confidence": options.confidence,
        "latency_images": min(options.latency_images, len(images.report_labels)),
        "latency_block": comparison.latency_block,
        "batch_size": options.batch_size, "runtimes": comparison.runtimes,
        "litert_threads": litert_threads(options),
        "models": [{
            "name": loaded.name, "model_dir": loaded.model_dir,
            "checkpoint": loaded.checkpoint, "params": loaded.cost.params,
            "runtimes": {runtime: _view(comparison, by_model[loaded.name])
                         for runtime, by_model in comparison.results.items()}}
            for loaded in comparison.models]}


def _view(comparison: Comparison, result: ModelResult) -> dict:
    """One model on one runtime: the same keys for every runtime and model (a one-exit
    model's ``default`` and ``exit_distribution`` are null)."""
    evaluation = result.evaluation
    default = evaluation.default
    return {
        "exits": [{"exit": e.exit, "macs": e.macs, "accuracy": accuracy}
                  for e, accuracy in zip(evaluation.cost.exits, evaluation.exit_accuracy)],
        "budgeted": [r.to_json() for p, r in evaluation.points.items() if p != points.DEFAULT],
        "default": None if default is None else default.to_json(),
        "exit_distribution": None if default is None else {
            "overall": list(default.point.exit_fractions),
            "per_class": [list(row) for row in default.point.exit_fractions_per_class]},
        "latency_ms": {p.path: {**stats.to_json(), **(
            result.overhead[p].to_json() if p in result.overhead else {})}
            for p, stats in result.latency.items()},
        "throughput_ips": {p.path: ips for p, ips in _throughput(comparison, result).items()},
    }


def _at_equal_accuracy(comparison: Comparison) -> Dict[str, Dict[str, dict]]:
    """{runtime: {baseline: entry}}: the adaptive model's point at each baseline's accuracy,
    timed; the ratios are baseline over RANet (> 1: RANet computes less, answers sooner)."""
    at_equal = {}
    for runtime, chosen in comparison.at_equal_accuracy.items():
        timed = comparison.results[runtime]
        at_equal[runtime] = {baseline: equal_accuracy.to_json(
            choice, _stats(timed[comparison.adaptive_model].latency.get(choice.path)),
            _stats(timed[baseline].latency.get(points.FULL)))
            for baseline, choice in chosen.items()}
    return at_equal


def _stats(stats: Optional[latency.LatencyStats]) -> Optional[dict]:
    return None if stats is None else stats.to_json()


def _thresholds_text(values) -> str:
    return ", ".join(f"{float(v):.3f}" if math.isfinite(float(v)) else str(v) for v in values)


def _budget_rows(results: List[BudgetedResult]) -> List[str]:
    rows = ["| point | expected MMACs | accuracy | calibration accuracy | exit fractions | "
            "thresholds |", "| --- | ---: | ---: | ---: | --- | --- |"]
    for result in results:
        point = result.point
        rows.append(f"| {result.point_id.label} | {point.expected_macs / 1e6:.2f} | "
                    f"{100 * point.accuracy:.2f}% | {100 * result.calibration_accuracy:.2f}% | "
                    f"{', '.join(f'{f:.3f}' for f in point.exit_fractions)} | "
                    f"{_thresholds_text(point.thresholds)} |")
    return rows


_BLOCK_MEANING = {True: "cold: each call follows other models' calls",
                  False: "warm: most calls find their own weights cached"}


def _views(comparison: Comparison, name: str) -> Dict[str, ModelResult]:
    return {runtime: by_model[name] for runtime, by_model in comparison.results.items()}


def markdown(comparison: Comparison) -> str:
    options, images = comparison.options, comparison.images
    runtimes = comparison.runtimes
    environment = devices.device_info()
    lines = [f"# Evaluation on {images.report_name} ({len(images.report_labels)} images)", "",
             f"Thresholds calibrated on {images.calibration_name}, on each runtime's own "
             f"outputs. Device: {environment['device']}; TensorFlow "
             f"{environment['tensorflow']}; precision {options.precision}; XLA "
             f"{'on' if options.xla else 'off'} (batch-1 paths); threads intra "
             f"{environment['intra_op_threads']} / inter {environment['inter_op_threads']} "
             f"(0: all cores); runtimes {', '.join(runtimes)} (LiteRT: "
             f"{litert_threads(options)} XNNPACK threads); confidence {options.confidence}.",
             ""]
    lines += ["## Models", "", "| model | params | exits | MMACs (first..last) | "
              "accuracy (first..last, tf) |", "| --- | ---: | ---: | --- | --- |"]
    for loaded in comparison.models:
        evaluation = comparison.results[runtimes[0]][loaded.name].evaluation
        exits, accuracy = loaded.cost.exits, evaluation.exit_accuracy
        lines.append(f"| {loaded.name} | {loaded.cost.params / 1e6:.2f} M | {len(exits)} | "
                     f"{exits[0].macs / 1e6:.1f}..{exits[-1].macs / 1e6:.1f} | "
                     f"{100 * accuracy[0]:.2f}%..{100 * accuracy[-1]:.2f}% |")
    block = comparison.latency_block
    latency_images = min(options.latency_images, len(images.report_labels))
    lines += ["", "## Latency at batch 1 (ms) and throughput", "",
              f"Every path timed on {latency_images} images, interleaved with the "
              f"others', {block} in a row ({_BLOCK_MEANING[block == 1]}).", ""]
    lines += latency_table(comparison)
    lines += ["", f"Throughput: TensorFlow at batch {options.batch_size}; LiteRT one image at "
                  "a time (its stage files have batch 1)."]
    lines += _equal_accuracy_section(comparison)
    for loaded in comparison.models:
        views = _views(comparison, loaded.name)
        lines += ["", f"## {loaded.name}: anytime", "",
                  "| exit | MMACs | " + " | ".join(views) + " |",
                  "| ---: | ---: |" + " ---: |" * len(views)]
        for k, exit_ in enumerate(loaded.cost.exits):
            lines.append(f"| {exit_.exit} | {exit_.macs / 1e6:.2f} | " + " | ".join(
                f"{100 * view.evaluation.exit_accuracy[k]:.2f}%" for view in views.values())
                + " |")
        if len(loaded.cost.exits) == 1:
            continue
        for runtime, view in views.items():
            chosen = [r for p, r in view.evaluation.points.items() if p.kind != Kind.SWEEP]
            lines += ["", f"## {loaded.name}: operating points ({runtime})", ""]
            lines += _budget_rows(chosen)
        first = views[runtimes[0]].evaluation
        lines += ["", f"## {loaded.name}: budgeted sweep (p_k ~ q^k, {runtimes[0]})", ""]
        lines += _budget_rows(first.of_kind(Kind.SWEEP))
        point = first.default.point
        per_class = point.exit_fractions_per_class
        lines += ["", f"## {loaded.name}: exit distribution at the default point "
                      f"({runtimes[0]})", "",
                  "| class | " + " | ".join(f"exit {k + 1}" for k in range(len(per_class[0])))
                  + " |", "| --- |" + " ---: |" * len(per_class[0])]
        lines.append("| all | " + " | ".join(f"{f:.3f}" for f in point.exit_fractions) + " |")
        lines += [f"| {c} | " + " | ".join(f"{f:.3f}" for f in row) + " |"
                  for c, row in enumerate(per_class)]
    return "\n".join(lines) + "\n"


def _timed(comparison: Comparison) -> Iterator[Tuple[str, str, PointId, ModelResult]]:
    """(model, runtime, path, the model's result there) of every timed path."""
    for loaded in comparison.models:
        for runtime, result in _views(comparison, loaded.name).items():
            for path in result.latency:
                yield loaded.name, runtime, path, result


def latency_table(comparison: Comparison, throughput: bool = True) -> List[str]:
    """The markdown table of every timed path's batch-1 latency (ms) on every runtime; for
    an adaptive path, the time its exits would take with free hand-offs (expected ms: the
    share leaving at each exit times the time up to that exit) and its mean over that; and
    images/s at the report's batch size unless ``throughput`` is False."""
    statistics = ("p50", "p90", "p99", "mean")
    columns = statistics + ("expected ms", "overhead") + (("images/s",) if throughput else ())
    lines = ["| model | runtime | path | " + " | ".join(columns) + " |",
             "| --- | --- | --- |" + " ---: |" * len(columns)]
    for name, runtime, path, result in _timed(comparison):
        stats, overhead = result.latency[path], result.overhead.get(path)
        cells = [f"{getattr(stats, key):.2f}" for key in statistics]
        cells += (["", ""] if overhead is None else
                  [f"{overhead.expected_ms:.2f}", f"{overhead.overhead:.2f}x"])
        if throughput:
            ips = _throughput(comparison, result).get(path)
            cells.append("" if ips is None else f"{ips:.0f}")
        lines.append(f"| {name} | {runtime} | {path.path} | " + " | ".join(cells) + " |")
    return lines


def _ratio(value: Optional[float]) -> str:
    return "" if value is None else f"{value:.2f}x"


def _equal_accuracy_section(comparison: Comparison) -> List[str]:
    ranet = comparison.adaptive_model
    at_equal = _at_equal_accuracy(comparison)
    if ranet is None or not any(at_equal.values()):
        return []
    images = comparison.images
    lines = ["", "## At equal accuracy", "",
             f"For each baseline, the cheapest operating point of {ranet} (calibrated on "
             f"{images.calibration_name}) whose accuracy on {images.report_name} is at least "
             "the baseline's there, on the same runtime; ratios are baseline / "
             f"{ranet} (> 1: {ranet} computes less, answers sooner). The interval is the paired "
             "95% interval of the accuracy difference over the same images.", "",
             f"| runtime | baseline | baseline accuracy | {ranet} point | {ranet} accuracy | "
             "difference (95% CI, points) | expected MMACs | MACs ratio | p50 ms (baseline / "
             f"{ranet}) | p50 ratio | p90 ratio |",
             "| --- | --- | ---: | --- | ---: | --- | ---: | ---: | --- | ---: | ---: |"]
    missed = []
    for runtime, by_baseline in at_equal.items():
        for baseline, entry in by_baseline.items():
            choice = comparison.at_equal_accuracy[runtime][baseline]
            low, high = entry["difference_ci95"]
            p50 = ""
            if entry["ranet_latency_ms"] and entry["baseline_latency_ms"]:
                p50 = (f"{entry['baseline_latency_ms']['p50']:.2f} / "
                       f"{entry['ranet_latency_ms']['p50']:.2f}")
            lines.append(
                f"| {runtime} | {baseline} | {100 * entry['baseline_accuracy']:.2f}% | "
                f"{choice.point.point_id.label}"
                f"{'' if entry['reaches'] else ' (most accurate; none reaches)'} "
                f"| {100 * entry['ranet_accuracy']:.2f}% | {entry['gap_points']:+.2f} "
                f"[{100 * low:+.2f}, {100 * high:+.2f}] | "
                f"{choice.point.expected_macs / 1e6:.2f} | {entry['macs_ratio']:.2f}x | {p50} | "
                f"{_ratio(entry['latency_ratio_p50'])} | {_ratio(entry['latency_ratio_p90'])} |")
            if not entry["reaches"]:
                missed.append(f"- {runtime}, {baseline}: no {ranet} point reaches "
                              f"{100 * entry['baseline_accuracy']:.2f}%; its most accurate is "
                              f"{-entry['gap_points']:.2f} points below, where it answers "
                              f"{_ratio(entry['latency_ratio_p50'])} as fast (p50).")
    return lines + ([""] + missed if missed else [])


def _path_accuracy(comparison: Comparison, runtime: str, name: str,
                   path: PointId) -> Optional[float]:
    """Accuracy of a timed path on the reported split (None: keras_predict, which is the full
    path timed the seed's way)."""
    if path.kind == Kind.EQUAL:
        return comparison.at_equal_accuracy[runtime][path.value].point.accuracy
    return comparison.results[runtime][name].evaluation.accuracy_of(path)


def plot(comparison: Comparison, report_dir: str) -> List[str]:
    """Accuracy vs multiply-adds and vs batch-1 latency; returns the files written."""
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    runtimes = comparison.runtimes
    written = []
    figure, axes = plt.subplots(figsize=(7, 5))
    for loaded in comparison.models:
        evaluation = comparison.results[runtimes[0]][loaded.name].evaluation
        macs = [e.macs / 1e6 for e in loaded.cost.exits]
        accuracy = [100 * a for a in evaluation.exit_accuracy]
        if len(macs) == 1:
            axes.scatter(macs, accuracy, marker="s", s=60, label=loaded.name)
            continue
        axes.plot(macs, accuracy, "o--", label=f"{loaded.name} anytime")
        sweep = sorted((r.point.expected_macs / 1e6, 100 * r.point.accuracy)
                       for r in evaluation.of_kind(Kind.SWEEP))
        axes.plot(*zip(*sweep), "-", label=f"{loaded.name} budgeted")
    _style(axes, "multiply-adds per image (millions, log)",
           f"Accuracy vs computation ({comparison.images.report_name}, {runtimes[0]})")
    written.append(_save(plt, figure, os.path.join(report_dir, PLOT_MACS)))

    device = devices.device_info()["device"]
    figure, panels = plt.subplots(1, len(runtimes), figsize=(6 * len(runtimes), 5),
                                  squeeze=False)
    for axes, runtime in zip(panels[0], runtimes):
        for loaded in comparison.models:
            timed = comparison.results[runtime][loaded.name].latency

            def curve(anytime: bool):
                return sorted((stats.p50, 100 * accuracy) for path, stats in timed.items()
                              if (path.kind == Kind.UP_TO_EXIT) == anytime and
                              (accuracy := _path_accuracy(comparison, runtime, loaded.name,
                                                          path)) is not None)
            if len(loaded.cost.exits) == 1:
                axes.scatter(*zip(*curve(False)), marker="s", s=60, label=loaded.name)
                continue
            for anytime, style, what in ((True, "o--", "anytime, up to exit k"),
                                         (False, "o-", "operating points")):
                if curve(anytime):
                    axes.plot(*zip(*curve(anytime)), style, label=f"{loaded.name} ({what})")
        _style(axes, "batch-1 latency p50 (ms, log)", f"{runtime} ({device})")
    written.append(_save(plt, figure, os.path.join(report_dir, PLOT_LATENCY)))
    return written


def _style(axes, xlabel: str, title: str) -> None:
    from matplotlib import ticker
    axes.set_xscale("log")
    # Plain numbers at 1, 2 and 5 per decade: the default minor labels of a log axis that spans
    # less than a decade print as overlapping powers of ten.
    axes.xaxis.set_major_formatter(ticker.FormatStrFormatter("%g"))
    axes.xaxis.set_minor_locator(ticker.LogLocator(subs=(2.0, 5.0)))
    axes.xaxis.set_minor_formatter(ticker.FormatStrFormatter("%g"))
    axes.set(xlabel=xlabel, ylabel="accuracy (%)", title=title)
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize=8)


def _save(plt, figure, path: str) -> str:
    figure.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(figure)
    return path


def write_tensorboard(comparison: Comparison, log_dir: str) -> None:
    """Per model and runtime: anytime accuracy (step = exit), the budgeted sweep (step =
    expected kMACs) and each timed path's p50."""
    for loaded in comparison.models:
        writer = tf.summary.create_file_writer(os.path.join(log_dir, loaded.name))
        with writer.as_default():
            for runtime, result in _views(comparison, loaded.name).items():
                evaluation = result.evaluation
                for exit_, accuracy in zip(loaded.cost.exits, evaluation.exit_accuracy):
                    tf.summary.scalar(f"{runtime}/anytime/accuracy", accuracy, step=exit_.exit)
                for r in evaluation.of_kind(Kind.SWEEP):
                    tf.summary.scalar(f"{runtime}/budgeted/accuracy", r.point.accuracy,
                                      step=int(round(r.point.expected_macs / 1e3)))
                for path, stats in result.latency.items():
                    tf.summary.scalar(f"{runtime}/latency_p50_ms/{path.path}", stats.p50,
                                      step=0)
        writer.close()


def write(comparison: Comparison, report_dir: str) -> Tuple[dict, List[str]]:
    """Writes every output into ``report_dir``; returns report.json's content and the paths
    written."""
    # Rendered before anything is written, so a rendering error leaves no partial report.
    content = build(comparison)
    texts = {REPORT_JSON: jsonio.dumps(content), REPORT_MD: markdown(comparison)}
    os.makedirs(report_dir, exist_ok=True)
    paths = []
    for name, text in texts.items():
        paths.append(os.path.join(report_dir, name))
        with open(paths[-1], "w") as f:
            f.write(text)
    paths += plot(comparison, report_dir)
    write_tensorboard(comparison, os.path.join(report_dir, "tensorboard"))
    return content, paths

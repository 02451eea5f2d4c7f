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
from ranet.inference import equal_accuracy, equal_budget, points
from ranet.inference.comparison import Comparison, ModelResult, litert_threads
from ranet.inference.equal_accuracy import Match, Pair
from ranet.inference.evaluation import BudgetedResult
from ranet.inference.points import Kind, PointId

REPORT_JSON = "report.json"
REPORT_MD = "report.md"
PLOT_MACS = "accuracy_vs_macs.png"
PLOT_LATENCY = "accuracy_vs_latency.png"
PLOT_ANYTIME = "anytime.png"
PLOT_BUDGETED = "budgeted_macs.png"


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
        "adaptive_models": comparison.adaptive_models,
        "at_equal_accuracy": _pair_entries(comparison, comparison.at_equal_accuracy),
        "at_equal_budget": _pair_entries(comparison, comparison.at_equal_budget),
        "verdict": {runtime: {pair.key: verdict.to_json() for pair, verdict in by_pair.items()}
                    for runtime, by_pair in _verdicts(comparison).items()},
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


def _pair_entries(comparison: Comparison, matched: Dict[str, Dict[Pair, List[Match]]]
                  ) -> Dict[str, Dict[str, List[dict]]]:
    """{runtime: {"A vs B": [entry]}}: one entry per point of B, with the latency of each
    side's point where it was timed; ratios are B over A (> 1: A computes less, answers
    sooner)."""
    return {runtime: {pair.key: [_entry(comparison, runtime, m) for m in matches]
                      for pair, matches in by_pair.items()}
            for runtime, by_pair in matched.items()}


def _entry(comparison: Comparison, runtime: str, matched: Match) -> dict:
    pair = matched.pair
    return equal_accuracy.to_json(
        matched, _path_stats(comparison, runtime, pair.model, matched.path),
        _path_stats(comparison, runtime, pair.other, matched.target_path))


def _path_stats(comparison: Comparison, runtime: str, model: str,
                path: Optional[PointId]) -> Optional[dict]:
    stats = None if path is None else comparison.results[runtime][model].latency.get(path)
    return None if stats is None else stats.to_json()


def _verdicts(comparison: Comparison) -> Dict[str, Dict[Pair, equal_budget.Verdict]]:
    return {runtime: {pair: equal_budget.verdict(runtime, pair, matches)
                      for pair, matches in by_pair.items()}
            for runtime, by_pair in comparison.at_equal_budget.items()}


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
    lines += _pair_sections(comparison)
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
    share leaving at each exit times the time up to that exit), its mean over that and the
    route it ran by (the switch stage: stages one by one before it, the rest in one call);
    and images/s at the report's batch size unless ``throughput`` is False."""
    statistics = ("p50", "p90", "p99", "mean")
    columns = statistics + ("expected ms", "overhead", "route") + (
        ("images/s",) if throughput else ())
    lines = ["| model | runtime | path | " + " | ".join(columns) + " |",
             "| --- | --- | --- |" + " ---: |" * len(columns)]
    for name, runtime, path, result in _timed(comparison):
        stats, overhead = result.latency[path], result.overhead.get(path)
        cells = [f"{getattr(stats, key):.2f}" for key in statistics]
        cells += (["", "", ""] if overhead is None else
                  [f"{overhead.expected_ms:.2f}", f"{overhead.overhead:.2f}x",
                   "" if overhead.route is None else f"s={overhead.route}"])
        if throughput:
            ips = _throughput(comparison, result).get(path)
            cells.append("" if ips is None else f"{ips:.0f}")
        lines.append(f"| {name} | {runtime} | {path.path} | " + " | ".join(cells) + " |")
    return lines


def _ratio(value: Optional[float]) -> str:
    return "" if value is None else f"{value:.2f}x"


def _equal_accuracy_section(comparison: Comparison) -> List[str]:
    adaptive = comparison.adaptive_models
    rows = [(runtime, m) for runtime, by_pair in comparison.at_equal_accuracy.items()
            for pair, matches in by_pair.items() if pair.other not in adaptive for m in matches]
    if not rows:
        return []
    images = comparison.images
    lines = ["", "## At equal accuracy", "",
             "For each baseline, the cheapest operating point of each model with exits "
             f"(calibrated on {images.calibration_name}) whose accuracy on {images.report_name} "
             "is at least the baseline's there, on the same runtime; ratios are baseline / "
             "model (> 1: the model computes less, answers sooner). The interval is the paired "
             "95% interval of the accuracy difference over the same images.", "",
             "| runtime | model | baseline | baseline accuracy | point | accuracy | difference "
             "(95% CI, points) | expected MMACs | MACs ratio | p50 ms (baseline / model) | "
             "p50 ratio | p90 ratio |",
             "| --- | --- | --- | ---: | --- | ---: | --- | ---: | ---: | --- | ---: | ---: |"]
    missed = []
    for runtime, matched in rows:
        entry = _entry(comparison, runtime, matched)
        model, baseline = matched.pair.model, matched.pair.other
        point, target = matched.point, matched.target
        latency_ms = entry["latency_ms"]
        p50 = ""
        if latency_ms[model] and latency_ms[baseline]:
            p50 = f"{latency_ms[baseline]['p50']:.2f} / {latency_ms[model]['p50']:.2f}"
        lines.append(
            f"| {runtime} | {model} | {baseline} | {100 * target.accuracy:.2f}% | "
            f"{point.point_id.label}"
            f"{'' if matched.reaches else ' (most accurate; none reaches)'} "
            f"| {100 * point.accuracy:.2f}% | {_difference(matched)} | "
            f"{point.expected_macs / 1e6:.2f} | {matched.macs_ratio:.2f}x | {p50} | "
            f"{_ratio(entry['latency_ratio_p50'])} | {_ratio(entry['latency_ratio_p90'])} |")
        if not matched.reaches:
            missed.append(f"- {runtime}, {matched.pair.key}: no {model} point reaches "
                          f"{100 * target.accuracy:.2f}%; its most accurate is "
                          f"{-100 * matched.difference:.2f} points below, where it answers "
                          f"{_ratio(entry['latency_ratio_p50'])} as fast (p50).")
    return lines + ([""] + missed if missed else [])


def _difference(matched: Match) -> str:
    """accuracy(model) - accuracy(other) and its paired 95% interval, in points."""
    low, high = matched.difference_ci95
    return f"{100 * matched.difference:+.2f} [{100 * low:+.2f}, {100 * high:+.2f}]"


def _pair_sections(comparison: Comparison) -> List[str]:
    """Per pair of models with exits: the verdict at equal budget on every runtime, then
    each runtime's table, one row per point of the second model."""
    images = comparison.images
    verdicts = _verdicts(comparison)
    # Every runtime evaluates the same models, so holds the same pairs.
    pairs = next(iter(verdicts.values()), {})
    lines = []
    for pair in pairs:
        model, other = pair.model, pair.other
        lines += ["", f"## {pair.key}", "",
                  f"At each operating point of {other} (calibrated on "
                  f"{images.calibration_name}; its expected multiply-adds on "
                  f"{images.report_name} are the budget): the most accurate point of {model} "
                  "that costs no more (a point it has, never interpolated), with the paired "
                  f"95% interval of accuracy({model}) - accuracy({other}); and the cheapest "
                  f"point of {model} as accurate, with ratios {other} / {model} (> 1: "
                  f"{model} computes less, answers sooner; latency only where both points "
                  "were timed).", ""]
        lines += [f"- {by_pair[pair].text}" for by_pair in verdicts.values()]
        for runtime in verdicts:
            lines += ["", f"### {pair.key} ({runtime})", ""]
            lines += _pair_rows(comparison, runtime, pair)
    return lines


def _pair_rows(comparison: Comparison, runtime: str, pair: Pair) -> List[str]:
    model, other = pair.model, pair.other
    rows = [f"| {other} point | MMACs | accuracy | {model} at no more MMACs | MMACs | accuracy "
            f"| difference (95% CI, points) | {model} as accurate | MMACs | MACs ratio | "
            "p50 ratio |",
            "| --- | ---: | ---: | --- | ---: | ---: | --- | --- | ---: | ---: | ---: |"]
    # Both lists hold one match per point of ``other``, in the same order.
    for budget, accurate in zip(comparison.at_equal_budget[runtime][pair],
                                comparison.at_equal_accuracy[runtime][pair], strict=True):
        target, point = budget.target, budget.point
        cells = [target.point_id.label, f"{target.expected_macs / 1e6:.2f}",
                 f"{100 * target.accuracy:.2f}%"]
        cells += (["none cheap enough", "", "", ""] if point is None else
                  [point.point_id.label, f"{point.expected_macs / 1e6:.2f}",
                   f"{100 * point.accuracy:.2f}%", _difference(budget)])
        entry = _entry(comparison, runtime, accurate)
        cells += [accurate.point.point_id.label
                  + ("" if accurate.reaches else " (most accurate; none reaches)"),
                  f"{accurate.point.expected_macs / 1e6:.2f}", f"{accurate.macs_ratio:.2f}x",
                  _ratio(entry["latency_ratio_p50"])]
        rows.append("| " + " | ".join(cells) + " |")
    return rows


def _path_accuracy(comparison: Comparison, runtime: str, name: str,
                   path: PointId) -> Optional[float]:
    """Accuracy of a timed path on the reported split (None: keras_predict, which is the full
    path timed the seed's way)."""
    if path.kind == Kind.EQUAL:
        (matched,) = comparison.at_equal_accuracy[runtime][Pair(name, path.value)]
        return matched.point.accuracy
    return comparison.results[runtime][name].evaluation.accuracy_of(path)


def plot(comparison: Comparison, report_dir: str) -> List[str]:
    """Accuracy vs multiply-adds and vs batch-1 latency; with models with exits, each one's
    anytime curve and its calibrated points against expected multiply-adds, per runtime.
    Returns the files written."""
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    # One colour per model on every plot, so that a model is found by its colour.
    colors = {loaded.name: f"C{index % 10}" for index, loaded in enumerate(comparison.models)}
    figures = {PLOT_MACS: _accuracy_vs_macs, PLOT_LATENCY: _accuracy_vs_latency}
    if comparison.adaptive_models:
        figures.update({PLOT_ANYTIME: _anytime, PLOT_BUDGETED: _budgeted_macs})
    written = []
    for name, draw in figures.items():
        figure = draw(plt, comparison, colors)
        written.append(_save(plt, figure, os.path.join(report_dir, name)))
    return written


def _accuracy_vs_macs(plt, comparison: Comparison, colors: Dict[str, str]):
    runtime = comparison.runtimes[0]
    figure, axes = plt.subplots(figsize=(7, 5))
    for loaded in comparison.models:
        evaluation = comparison.results[runtime][loaded.name].evaluation
        macs = [e.macs / 1e6 for e in loaded.cost.exits]
        accuracy = [100 * a for a in evaluation.exit_accuracy]
        color = colors[loaded.name]
        if len(macs) == 1:
            axes.scatter(macs, accuracy, marker="s", s=60, color=color, label=loaded.name)
            continue
        axes.plot(macs, accuracy, "o--", color=color, label=f"{loaded.name} anytime")
        sweep = sorted((r.point.expected_macs / 1e6, 100 * r.point.accuracy)
                       for r in evaluation.of_kind(Kind.SWEEP))
        axes.plot(*zip(*sweep), "-", color=color, label=f"{loaded.name} budgeted")
    _style(axes, "multiply-adds per image (millions, log)",
           f"Accuracy vs computation ({comparison.images.report_name}, {runtime})")
    return figure


def _runtime_panels(plt, comparison: Comparison):
    """One panel per runtime, side by side."""
    runtimes = comparison.runtimes
    figure, panels = plt.subplots(1, len(runtimes), figsize=(6 * len(runtimes), 5),
                                  squeeze=False)
    return figure, zip(panels[0], runtimes)


def _accuracy_vs_latency(plt, comparison: Comparison, colors: Dict[str, str]):
    device = devices.device_info()["device"]
    figure, panels = _runtime_panels(plt, comparison)
    for axes, runtime in panels:
        for loaded in comparison.models:
            timed = comparison.results[runtime][loaded.name].latency
            color = colors[loaded.name]

            def curve(anytime: bool):
                return sorted((stats.p50, 100 * accuracy) for path, stats in timed.items()
                              if (path.kind == Kind.UP_TO_EXIT) == anytime and
                              (accuracy := _path_accuracy(comparison, runtime, loaded.name,
                                                          path)) is not None)
            if len(loaded.cost.exits) == 1:
                axes.scatter(*zip(*curve(False)), marker="s", s=60, color=color,
                             label=loaded.name)
                continue
            for anytime, style, what in ((True, "o--", "anytime, up to exit k"),
                                         (False, "o-", "operating points")):
                if curve(anytime):
                    axes.plot(*zip(*curve(anytime)), style, color=color,
                              label=f"{loaded.name} ({what})")
        _style(axes, "batch-1 latency p50 (ms, log)", f"{runtime} ({device})")
    return figure


def _anytime(plt, comparison: Comparison, colors: Dict[str, str]):
    """Every exit's accuracy against the multiply-adds up to it, a line per model with
    exits, a marker per exit: the paper's anytime prediction."""
    figure, panels = _runtime_panels(plt, comparison)
    for axes, runtime in panels:
        for name in comparison.adaptive_models:
            evaluation = comparison.results[runtime][name].evaluation
            axes.plot([e.macs / 1e6 for e in evaluation.cost.exits],
                      [100 * a for a in evaluation.exit_accuracy], "o-", color=colors[name],
                      label=name)
        _style(axes, "multiply-adds up to the exit (millions, log)",
               f"Anytime prediction ({comparison.images.report_name}, {runtime})")
    return figure


def _budgeted_macs(plt, comparison: Comparison, colors: Dict[str, str]):
    """Each model's calibrated points (accuracy on the reported images against their
    expected multiply-adds there), a curve per model with exits, a one-exit model as its
    one point: the paper's budgeted batch classification."""
    figure, panels = _runtime_panels(plt, comparison)
    for axes, runtime in panels:
        for loaded in comparison.models:
            evaluation = comparison.results[runtime][loaded.name].evaluation
            color = colors[loaded.name]
            if not evaluation.is_adaptive:
                axes.scatter([loaded.cost.exits[-1].macs / 1e6],
                             [100 * evaluation.exit_accuracy[-1]], marker="s", s=60,
                             color=color, label=loaded.name)
                continue
            calibrated = sorted((r.point.expected_macs / 1e6, 100 * r.point.accuracy)
                                for r in evaluation.points.values())
            axes.plot(*zip(*calibrated), ".-", color=color, label=loaded.name)
        _style(axes, "expected multiply-adds per image (millions, log)",
               f"Budgeted batch ({comparison.images.report_name}, {runtime})")
    return figure


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
    expected kMACs), each timed path's p50, and against each model with exits listed after
    it, the accuracy difference at equal budget (step = that model's expected kMACs)."""
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
                for pair, matches in comparison.at_equal_budget.get(runtime, {}).items():
                    if pair.model == loaded.name:
                        _equal_budget_scalars(runtime, pair, matches)
        writer.close()


def _equal_budget_scalars(runtime: str, pair: Pair, matches: List[Match]) -> None:
    for matched in matches:
        if matched.point is not None:
            tf.summary.scalar(f"{runtime}/at_equal_budget/{pair.other}/accuracy_difference",
                              matched.difference,
                              step=int(round(matched.target.expected_macs / 1e3)))


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

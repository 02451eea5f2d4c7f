"""Renders a comparison: report.json, report.md, PNG plots and TensorBoard scalars."""

import math
import os
from typing import Dict, List, Optional

import tensorflow as tf

from ranet import jsonio
from ranet.inference import equal_accuracy, latency
from ranet.inference.comparison import litert_threads
from ranet.inference.evaluation import ModelEvaluation

REPORT_JSON = "report.json"
REPORT_MD = "report.md"
PLOT_MACS = "accuracy_vs_macs.png"
PLOT_LATENCY = "accuracy_vs_latency.png"


def build(comparison, options) -> dict:
    """The report.json content of a ``comparison.Comparison`` made with ``options``.

    The keys of each model are its TensorFlow evaluation and timing; ``runtimes`` holds the
    same for every other runtime measured (LiteRT), with the same path names.
    """
    environment = latency.device_info()
    images = comparison.images
    runtimes = list(comparison.results)
    models = []
    for loaded in comparison.models:
        views = {}
        for runtime in runtimes:
            result = comparison.results[runtime][loaded.name]
            views[runtime] = model_json(
                result.evaluation, {p: s.to_json() for p, s in result.latency.items()},
                result.throughput.get(options.batch_size, result.throughput.get(1, {})))
        entry = views.pop(runtimes[0])
        entry["runtimes"] = {runtime: {key: view[key] for key in _RUNTIME_KEYS if key in view}
                             for runtime, view in views.items()}
        models.append(entry)
    return {
        "split": images.report_name, "calibration_split": images.calibration_name,
        "adaptive_model": comparison.adaptive_model,
        "at_equal_accuracy": _at_equal_accuracy(comparison),
        "num_images": len(images.report_labels), "device": environment["device"],
        "tensorflow": environment["tensorflow"], "environment": environment,
        "precision": options.precision, "xla": options.xla, "confidence": options.confidence,
        "latency_images": min(options.latency_images, len(images.report_labels)),
        "latency_block": comparison.latency_block,
        "batch_size": options.batch_size, "runtimes": runtimes,
        "litert_threads": litert_threads(options), "models": models}


def _at_equal_accuracy(comparison) -> Dict[str, Dict[str, dict]]:
    """{runtime: {baseline: entry}}: the adaptive model's point at each baseline's accuracy,
    timed; the ratios are baseline over RANet (> 1: RANet computes less, answers sooner)."""
    at_equal = {}
    for runtime, chosen in comparison.at_equal_accuracy.items():
        timed = comparison.results[runtime]
        at_equal[runtime] = {baseline: equal_accuracy.to_json(
            choice, _stats(timed[comparison.adaptive_model].latency.get(choice.path)),
            _stats(timed[baseline].latency.get(latency.FULL)))
            for baseline, choice in chosen.items()}
    return at_equal


def _stats(stats: Optional[latency.LatencyStats]) -> Optional[dict]:
    return None if stats is None else stats.to_json()


# What a model's entry holds for each runtime beyond TensorFlow.
_RUNTIME_KEYS = ("latency_ms", "exits", "budgeted", "default", "throughput_ips")


def model_json(evaluation: ModelEvaluation, latency_ms: Dict[str, dict],
               throughput_ips: Dict[str, float]) -> dict:
    cost = evaluation.cost
    budgeted = [r.to_json() for r in evaluation.sweep + evaluation.budgets]
    if evaluation.fixed is not None:
        budgeted.append(evaluation.fixed.to_json())
    entry = {
        "name": evaluation.name, "model_dir": evaluation.model_dir,
        "checkpoint": evaluation.checkpoint, "params": cost.params,
        "exits": [{"exit": e.exit, "macs": e.macs, "accuracy": acc}
                  for e, acc in zip(cost.exits, evaluation.exit_accuracy)],
        "budgeted": budgeted,
        "latency_ms": latency_ms, "throughput_ips": throughput_ips,
    }
    if evaluation.default is not None:
        point = evaluation.default.point
        entry["default"] = evaluation.default.to_json()
        entry["exit_distribution"] = {
            "overall": [float(f) for f in point.exit_fractions],
            "per_class": [[float(f) for f in row] for row in point.exit_fractions_per_class]}
    return entry


def runtime_views(model: dict, runtimes: List[str]) -> Dict[str, dict]:
    """A model's entry per runtime: the TensorFlow keys, then each of ``runtimes``."""
    return {runtime: model if index == 0 else model["runtimes"][runtime]
            for index, runtime in enumerate(runtimes)}


def _thresholds_text(values) -> str:
    return ", ".join(f"{float(v):.3f}" if math.isfinite(float(v)) else str(v) for v in values)


def _label(point: dict) -> str:
    for key, prefix in (("point", ""), ("q", "q="), ("budget_mflops", "budget "),
                        ("threshold", "fixed threshold ")):
        if key in point:
            value = point[key]
            text = value if isinstance(value, str) else f"{value:g}"
            return f"{prefix}{text}" + (" M" if key == "budget_mflops" else "")
    raise ValueError(f"an operating point without a label: {point}")


def _budget_rows(points: List[dict]) -> List[str]:
    rows = ["| point | expected MMACs | accuracy | calibration accuracy | exit fractions | "
            "thresholds |", "| --- | ---: | ---: | ---: | --- | --- |"]
    for point in points:
        rows.append(f"| {_label(point)} | {point['expected_macs'] / 1e6:.2f} | "
                    f"{100 * point['accuracy']:.2f}% | {100 * point['calibration_accuracy']:.2f}% | "
                    f"{', '.join(f'{f:.3f}' for f in point['exit_fractions'])} | "
                    f"{_thresholds_text(point['thresholds'])} |")
    return rows


_BLOCK_MEANING = {True: "cold: each call follows other models' calls",
                  False: "warm: most calls find their own weights cached"}


def markdown(report: dict) -> str:
    runtimes = report["runtimes"]
    lines = [f"# Evaluation on {report['split']} ({report['num_images']} images)", "",
             f"Thresholds calibrated on {report['calibration_split']}, on each runtime's own "
             f"outputs. Device: {report['device']}; TensorFlow {report['tensorflow']}; "
             f"precision {report['precision']}; XLA {'on' if report['xla'] else 'off'} "
             f"(batch-1 paths); threads intra {report['environment']['intra_op_threads']} / "
             f"inter {report['environment']['inter_op_threads']} (0: all cores); runtimes "
             f"{', '.join(runtimes)} (LiteRT: {report['litert_threads']} XNNPACK threads); "
             f"confidence {report['confidence']}.", ""]
    lines += ["## Models", "", "| model | params | exits | MMACs (first..last) | "
              "accuracy (first..last) |", "| --- | ---: | ---: | --- | --- |"]
    for model in report["models"]:
        exits = model["exits"]
        lines.append(f"| {model['name']} | {model['params'] / 1e6:.2f} M | {len(exits)} | "
                     f"{exits[0]['macs'] / 1e6:.1f}..{exits[-1]['macs'] / 1e6:.1f} | "
                     f"{100 * exits[0]['accuracy']:.2f}%..{100 * exits[-1]['accuracy']:.2f}% |")
    block = report.get("latency_block", 1)
    lines += ["", "## Latency at batch 1 (ms) and throughput", "",
              f"Every path timed on {report['latency_images']} images, interleaved with the "
              f"others', {block} in a row ({_BLOCK_MEANING[block == 1]}).", ""]
    lines += latency_table(report)
    lines += ["", "Throughput: TensorFlow at batch "
              f"{report['batch_size']}; LiteRT one image at a time (its files have batch 1)."]
    lines += _equal_accuracy_section(report)
    for model in report["models"]:
        views = runtime_views(model, runtimes)
        lines += ["", f"## {model['name']}: anytime", "",
                  "| exit | MMACs | " + " | ".join(views) + " |",
                  "| ---: | ---: |" + " ---: |" * len(views)]
        for k, exit_ in enumerate(model["exits"]):
            lines.append(f"| {exit_['exit']} | {exit_['macs'] / 1e6:.2f} | " + " | ".join(
                f"{100 * view['exits'][k]['accuracy']:.2f}%" for view in views.values()) + " |")
        if len(model["exits"]) == 1:
            continue
        for runtime, view in views.items():
            chosen = [view["default"]] + [p for p in view["budgeted"] if "q" not in p]
            lines += ["", f"## {model['name']}: operating points ({runtime})", ""]
            lines += _budget_rows(chosen)
        lines += ["", f"## {model['name']}: budgeted sweep (p_k ~ q^k, {runtimes[0]})", ""]
        lines += _budget_rows([p for p in model["budgeted"] if "q" in p])
        per_class = model["exit_distribution"]["per_class"]
        lines += ["", f"## {model['name']}: exit distribution at the default point "
                      f"({runtimes[0]})", "",
                  "| class | " + " | ".join(f"exit {k + 1}" for k in range(len(per_class[0])))
                  + " |", "| --- |" + " ---: |" * len(per_class[0])]
        lines.append("| all | " + " | ".join(f"{f:.3f}" for f in
                                             model["exit_distribution"]["overall"]) + " |")
        lines += [f"| {c} | " + " | ".join(f"{f:.3f}" for f in row) + " |"
                  for c, row in enumerate(per_class)]
    return "\n".join(lines) + "\n"


def latency_table(report: dict, throughput: bool = True) -> List[str]:
    """The markdown table of every timed path's batch-1 latency (ms) on every runtime, and
    its images/s at the report's batch size unless ``throughput`` is False."""
    statistics = ("p50", "p90", "p99", "mean")
    columns = statistics + (("images/s",) if throughput else ())
    lines = ["| model | runtime | path | " + " | ".join(columns) + " |",
             "| --- | --- | --- |" + " ---: |" * len(columns)]
    for model in report["models"]:
        for runtime, view in runtime_views(model, report["runtimes"]).items():
            for path, stats in view["latency_ms"].items():
                cells = [f"{stats[key]:.2f}" for key in statistics]
                if throughput:
                    ips = view["throughput_ips"].get(path)
                    cells.append("" if ips is None else f"{ips:.0f}")
                lines.append(f"| {model['name']} | {runtime} | {path} | " + " | ".join(cells)
                             + " |")
    return lines


def _ratio(value: Optional[float]) -> str:
    return "" if value is None else f"{value:.2f}x"


def _equal_accuracy_section(report: dict) -> List[str]:
    ranet = report.get("adaptive_model")
    at_equal = report.get("at_equal_accuracy") or {}
    if ranet is None or not any(at_equal.values()):
        return []
    lines = ["", "## At equal accuracy", "",
             f"For each baseline, the cheapest operating point of {ranet} (calibrated on "
             f"{report['calibration_split']}) whose accuracy on {report['split']} is at least the "
             "baseline's there, on the same runtime; ratios are baseline / "
             f"{ranet} (> 1: {ranet} computes less, answers sooner). The interval is the paired "
             "95% interval of the accuracy difference over the same images.", "",
             f"| runtime | baseline | baseline accuracy | {ranet} point | {ranet} accuracy | "
             "difference (95% CI, points) | expected MMACs | MACs ratio | p50 ms (baseline / "
             f"{ranet}) | p50 ratio | p90 ratio |",
             "| --- | --- | ---: | --- | ---: | --- | ---: | ---: | --- | ---: | ---: |"]
    missed = []
    for runtime, by_baseline in at_equal.items():
        for baseline, entry in by_baseline.items():
            point = entry["ranet_point"]
            low, high = entry["difference_ci95"]
            p50 = ""
            if entry["ranet_latency_ms"] and entry["baseline_latency_ms"]:
                p50 = (f"{entry['baseline_latency_ms']['p50']:.2f} / "
                       f"{entry['ranet_latency_ms']['p50']:.2f}")
            lines.append(
                f"| {runtime} | {baseline} | {100 * entry['baseline_accuracy']:.2f}% | "
                f"{_label(point)}{'' if entry['reaches'] else ' (most accurate; none reaches)'} "
                f"| {100 * entry['ranet_accuracy']:.2f}% | {entry['gap_points']:+.2f} "
                f"[{100 * low:+.2f}, {100 * high:+.2f}] | {point['expected_macs'] / 1e6:.2f} | "
                f"{entry['macs_ratio']:.2f}x | {p50} | {_ratio(entry['latency_ratio_p50'])} | "
                f"{_ratio(entry['latency_ratio_p90'])} |")
            if not entry["reaches"]:
                missed.append(f"- {runtime}, {baseline}: no {ranet} point reaches "
                              f"{100 * entry['baseline_accuracy']:.2f}%; its most accurate is "
                              f"{-entry['gap_points']:.2f} points below, where it answers "
                              f"{_ratio(entry['latency_ratio_p50'])} as fast (p50).")
    return lines + ([""] + missed if missed else [])


def plot(report: dict, report_dir: str) -> List[str]:
    """Accuracy vs multiply-adds and vs batch-1 latency; returns the files written."""
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    written = []
    figure, axes = plt.subplots(figsize=(7, 5))
    for model in report["models"]:
        macs = [e["macs"] / 1e6 for e in model["exits"]]
        accuracy = [100 * e["accuracy"] for e in model["exits"]]
        if len(macs) == 1:
            axes.scatter(macs, accuracy, marker="s", s=60, label=model["name"])
            continue
        axes.plot(macs, accuracy, "o--", label=f"{model['name']} anytime")
        sweep = sorted((b["expected_macs"] / 1e6, 100 * b["accuracy"])
                       for b in model["budgeted"] if "q" in b)
        axes.plot(*zip(*sweep), "-", label=f"{model['name']} budgeted")
    _style(axes, "multiply-adds per image (millions, log)",
           f"Accuracy vs computation ({report['split']})")
    written.append(_save(plt, figure, os.path.join(report_dir, PLOT_MACS)))

    runtimes = report["runtimes"]
    figure, panels = plt.subplots(1, len(runtimes), figsize=(6 * len(runtimes), 5),
                                  squeeze=False)
    for axes, runtime in zip(panels[0], runtimes):
        at_equal = (report.get("at_equal_accuracy") or {}).get(runtime, {})
        for model in report["models"]:
            view = runtime_views(model, runtimes)[runtime]
            points = sorted((stats["p50"], 100 * accuracy)
                            for path, stats in view["latency_ms"].items()
                            if (accuracy := _path_accuracy(view, path, at_equal)) is not None)
            if len(model["exits"]) == 1:
                axes.scatter(*zip(*points), marker="s", s=60, label=model["name"])
            elif points:
                axes.plot(*zip(*points), "o-", label=f"{model['name']} (operating points)")
        _style(axes, "batch-1 latency p50 (ms, log)", f"{runtime} ({report['device']})")
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


def _path_accuracy(view: dict, path: str, at_equal: Dict[str, dict]) -> Optional[float]:
    """Accuracy of a timed path on the reported split (None: keras_predict, which is the full
    path timed the seed's way)."""
    if path == latency.FULL:
        return view["exits"][-1]["accuracy"]
    if path == latency.ADAPTIVE:
        return view["default"]["accuracy"]
    if path.startswith(equal_accuracy.PATH_PREFIX):
        return at_equal[path[len(equal_accuracy.PATH_PREFIX):]]["ranet_accuracy"]
    budget = latency.path_budget(path)
    matches = [b["accuracy"] for b in view["budgeted"] if b.get("budget_mflops") == budget]
    return matches[0] if budget is not None and matches else None


def write_tensorboard(report: dict, log_dir: str) -> None:
    """Anytime accuracy (step = exit) and the budgeted sweep (step = expected kMACs)."""
    for model in report["models"]:
        writer = tf.summary.create_file_writer(os.path.join(log_dir, model["name"]))
        with writer.as_default():
            for e in model["exits"]:
                tf.summary.scalar("anytime/accuracy", e["accuracy"], step=e["exit"])
            for b in model["budgeted"]:
                if "q" in b:
                    tf.summary.scalar("budgeted/accuracy", b["accuracy"],
                                      step=int(round(b["expected_macs"] / 1e3)))
            for path, stats in model["latency_ms"].items():
                tf.summary.scalar(f"latency_p50_ms/{path}", stats["p50"], step=0)
        writer.close()


def write(report: dict, report_dir: str) -> List[str]:
    """Writes every output into ``report_dir``; returns the paths written."""
    # Rendered before anything is written, so a rendering error leaves no partial report.
    texts = {REPORT_JSON: jsonio.dumps(report), REPORT_MD: markdown(report)}
    os.makedirs(report_dir, exist_ok=True)
    paths = []
    for name, text in texts.items():
        paths.append(os.path.join(report_dir, name))
        with open(paths[-1], "w") as f:
            f.write(text)
    paths += plot(report, report_dir)
    write_tensorboard(report, os.path.join(report_dir, "tensorboard"))
    return paths


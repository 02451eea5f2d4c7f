"""Renders a comparison: report.json, report.md, PNG plots and TensorBoard scalars."""

import math
import os
from typing import Dict, List, Optional

import tensorflow as tf

from ranet import jsonio
from ranet.inference import latency
from ranet.inference.evaluation import BudgetedResult, ModelEvaluation

REPORT_JSON = "report.json"
REPORT_MD = "report.md"
PLOT_MACS = "accuracy_vs_macs.png"
PLOT_LATENCY = "accuracy_vs_latency.png"


def build(comparison, options) -> dict:
    """The report.json content of a ``comparison.Comparison`` made with ``options``."""
    environment = latency.device_info()
    images = comparison.images
    throughput = {name: by_batch[options.batch_size]
                  for name, by_batch in comparison.throughput.items()}
    return {
        "split": images.report_name, "calibration_split": images.calibration_name,
        "num_images": len(images.report_labels), "device": environment["device"],
        "tensorflow": environment["tensorflow"], "environment": environment,
        "precision": options.precision, "xla": options.xla, "confidence": options.confidence,
        "latency_images": min(options.latency_images, len(images.report_labels)),
        "batch_size": options.batch_size,
        "models": [model_json(e, {p: s.to_json() for p, s in comparison.latency[e.name].items()},
                              throughput[e.name]) for e in comparison.evaluations]}


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


def _thresholds_text(values) -> str:
    return ", ".join(f"{v:.3f}" if math.isfinite(v) else jsonio.number(v) for v in values)


def _label(result: BudgetedResult) -> str:
    (key, value), = result.label.items()
    if key == "point":
        return str(value)
    prefix = {"q": "q=", "budget_mflops": "budget ", "threshold": "fixed threshold "}[key]
    return f"{prefix}{value:g}" + (" M" if key == "budget_mflops" else "")


def _budget_rows(results: List[BudgetedResult]) -> List[str]:
    rows = ["| point | expected MMACs | accuracy | calibration accuracy | exit fractions | thresholds |",
            "| --- | ---: | ---: | ---: | --- | --- |"]
    for r in results:
        rows.append(f"| {_label(r)} | {r.point.expected_macs / 1e6:.2f} | "
                    f"{100 * r.point.accuracy:.2f}% | {100 * r.calibration_accuracy:.2f}% | "
                    f"{', '.join(f'{f:.3f}' for f in r.point.exit_fractions)} | "
                    f"{_thresholds_text(r.point.thresholds)} |")
    return rows


def markdown(report: dict, evaluations: List[ModelEvaluation]) -> str:
    lines = [f"# Evaluation on {report['split']} ({report['num_images']} images)", "",
             f"Thresholds calibrated on {report['calibration_split']}. Device: {report['device']}; "
             f"TensorFlow {report['tensorflow']}; precision {report['precision']}; XLA "
             f"{'on' if report['xla'] else 'off'} (batch-1 paths); threads "
             f"intra {report['environment']['intra_op_threads']} / inter "
             f"{report['environment']['inter_op_threads']} (0: all cores); confidence "
             f"{report['confidence']}.", ""]
    lines += ["## Models", "", "| model | params | exits | MMACs (first..last) | accuracy (first..last) |",
              "| --- | ---: | ---: | --- | --- |"]
    for model in report["models"]:
        exits = model["exits"]
        lines.append(f"| {model['name']} | {model['params'] / 1e6:.2f} M | {len(exits)} | "
                     f"{exits[0]['macs'] / 1e6:.1f}..{exits[-1]['macs'] / 1e6:.1f} | "
                     f"{100 * exits[0]['accuracy']:.2f}%..{100 * exits[-1]['accuracy']:.2f}% |")
    lines += ["", "## Latency at batch 1 (ms) and throughput", "",
              "| model | path | p50 | p90 | p99 | mean | images/s (batched) |",
              "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for model in report["models"]:
        for path, stats in model["latency_ms"].items():
            throughput = model["throughput_ips"].get(path)
            lines.append(f"| {model['name']} | {path} | {stats['p50']:.2f} | {stats['p90']:.2f} | "
                         f"{stats['p99']:.2f} | {stats['mean']:.2f} | "
                         f"{'' if throughput is None else f'{throughput:.0f}'} |")
    for model, evaluation in zip(report["models"], evaluations):
        if len(model["exits"]) == 1:
            continue
        lines += ["", f"## {model['name']}: anytime", "", "| exit | MMACs | accuracy |",
                  "| ---: | ---: | ---: |"]
        lines += [f"| {e['exit']} | {e['macs'] / 1e6:.2f} | {100 * e['accuracy']:.2f}% |"
                  for e in model["exits"]]
        chosen = ([evaluation.default] + evaluation.budgets
                  + ([evaluation.fixed] if evaluation.fixed else []))
        lines += ["", f"## {model['name']}: operating points", ""] + _budget_rows(chosen)
        lines += ["", f"## {model['name']}: budgeted sweep (p_k ~ q^k)", ""]
        lines += _budget_rows(evaluation.sweep)
        per_class = model["exit_distribution"]["per_class"]
        lines += ["", f"## {model['name']}: exit distribution at the default point", "",
                  "| class | " + " | ".join(f"exit {k + 1}" for k in range(len(per_class[0]))) + " |",
                  "| --- |" + " ---: |" * len(per_class[0])]
        lines.append("| all | " + " | ".join(f"{f:.3f}" for f in
                                             model["exit_distribution"]["overall"]) + " |")
        lines += [f"| {c} | " + " | ".join(f"{f:.3f}" for f in row) + " |"
                  for c, row in enumerate(per_class)]
    return "\n".join(lines) + "\n"


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
    axes.set_xscale("log")
    axes.set(xlabel="multiply-adds per image (millions, log)", ylabel="accuracy (%)",
             title=f"Accuracy vs computation ({report['split']})")
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize=8)
    written.append(os.path.join(report_dir, PLOT_MACS))
    figure.savefig(written[-1], dpi=120, bbox_inches="tight")
    plt.close(figure)

    figure, axes = plt.subplots(figsize=(7, 5))
    for model in report["models"]:
        points = []
        for path, stats in model["latency_ms"].items():
            if path == "keras_predict":
                continue
            accuracy = _path_accuracy(model, path)
            if accuracy is not None:
                points.append((stats["p50"], 100 * accuracy, path))
        for milliseconds, accuracy, path in points:
            axes.scatter([milliseconds], [accuracy], s=40)
            axes.annotate(f"{model['name']} {path}", (milliseconds, accuracy), fontsize=7)
    axes.set(xlabel="batch-1 latency p50 (ms)", ylabel="accuracy (%)",
             title=f"Accuracy vs latency ({report['device']})")
    axes.grid(True, alpha=0.3)
    written.append(os.path.join(report_dir, PLOT_LATENCY))
    figure.savefig(written[-1], dpi=120, bbox_inches="tight")
    plt.close(figure)
    return written


def _path_accuracy(model: dict, path: str) -> Optional[float]:
    if path == "full":
        return model["exits"][-1]["accuracy"]
    if path == "adaptive":
        return model["default"]["accuracy"]
    budget = float(path.split("@", 1)[1])
    matches = [b["accuracy"] for b in model["budgeted"] if b.get("budget_mflops") == budget]
    return matches[0] if matches else None


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


def write(report: dict, evaluations: List[ModelEvaluation], report_dir: str) -> List[str]:
    """Writes every output into ``report_dir``; returns the paths written."""
    # Rendered before anything is written, so a rendering error leaves no partial report.
    texts = {REPORT_JSON: jsonio.dumps(report), REPORT_MD: markdown(report, evaluations)}
    os.makedirs(report_dir, exist_ok=True)
    paths = []
    for name, text in texts.items():
        paths.append(os.path.join(report_dir, name))
        with open(paths[-1], "w") as f:
            f.write(text)
    paths += plot(report, report_dir)
    write_tensorboard(report, os.path.join(report_dir, "tensorboard"))
    return paths


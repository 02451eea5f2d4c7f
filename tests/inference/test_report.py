"""ranet.inference.report: report.json keys, the markdown tables and the files written."""

import json

import numpy as np
import pytest

from ranet import costs
from ranet.inference import comparison, evaluation, points, report
from ranet.inference.latency import LatencyStats
from helpers import HAND_COST as COST
from helpers import HAND_EXIT_1 as EXIT_1
from helpers import HAND_EXIT_2 as EXIT_2
from helpers import HAND_LABELS, event_scalars, hand_images, loaded


def _compared(runtimes=("tf", "litert_int8"), budget=20.0):
    """A comparison of one RANet on TensorFlow and LiteRT int8, the results inserted in the
    order of ``runtimes``, as ``compare`` would put them for that flag."""
    probabilities = np.array([EXIT_1, EXIT_2], np.float32)
    images = hand_images()
    evaluations = {
        "tf": evaluation.evaluate_exits(probabilities, probabilities, COST, images,
                                        name="ranet", model_dir="/runs/ranet",
                                        checkpoint="ckpt-1", budgets_mflops=(budget,)),
        "litert_int8": evaluation.evaluate_exits(probabilities[:, [0, 0, 2, 3]], probabilities,
                                                 COST, images, name="ranet",
                                                 model_dir="/runs/ranet", checkpoint="ckpt-1",
                                                 budgets_mflops=(budget,))}
    scales = {"tf": 1.0, "litert_int8": 0.1}
    throughput = {"tf": {16: {points.FULL: 100.0, points.DEFAULT: 180.0,
                              points.budget(budget): 200.0}},
                  "litert_int8": {1: {points.FULL: 900.0, points.DEFAULT: 1500.0,
                                      points.budget(budget): 1800.0}}}

    def stats(scale):
        return {path: LatencyStats(p50=scale * p50, p90=scale * p50 + 1, p99=scale * p50 + 2,
                                   mean=scale * p50, num_samples=4)
                for path, p50 in ((points.FULL, 3.0), (points.DEFAULT, 2.0),
                                  (points.budget(budget), 1.5))}

    options = comparison.ComparisonOptions(model_dir=("/runs/ranet",), batch_size=16,
                                           runtimes=tuple(runtimes))
    return comparison.Comparison(
        options=options, images=images, models=[loaded("ranet", evaluations["tf"])],
        results={runtime: {"ranet": comparison.ModelResult(
            evaluations[runtime], stats(scales[runtime]), throughput[runtime])}
            for runtime in options.runtimes})


def test_report_json_keeps_its_schema():
    content = report.build(_compared())
    assert {"split", "calibration_split", "num_images", "device", "tensorflow", "environment",
            "precision", "xla", "confidence", "latency_images", "batch_size", "models",
            "runtimes"} <= set(content)
    assert (content["split"], content["calibration_split"], content["num_images"]) == (
        "test", "validation", 4)
    (model,) = content["models"]
    assert {"name", "model_dir", "checkpoint", "params", "runtimes"} == set(model)
    tf_view, int8 = model["runtimes"]["tf"], model["runtimes"]["litert_int8"]
    # Every runtime has the same keys: TensorFlow is not special.
    assert set(tf_view) == set(int8) == {"exits", "budgeted", "default", "exit_distribution",
                                         "latency_ms", "throughput_ips"}
    assert tf_view["exits"] == [{"exit": 1, "macs": 10_000_000, "accuracy": 0.5},
                                {"exit": 2, "macs": 30_000_000, "accuracy": 1.0}]
    assert tf_view["default"]["thresholds"] == [pytest.approx(0.9), "-inf"]
    assert tf_view["default"]["point"] == {"kind": "default"}
    assert tf_view["default"]["path"] == "adaptive"
    assert tf_view["latency_ms"]["adaptive"]["p50"] == 2.0
    assert tf_view["throughput_ips"] == {"full": 100.0, "adaptive": 180.0, "budget@20": 200.0}
    assert tf_view["exit_distribution"]["overall"] == [0.25, 0.75]
    assert sum(1 for p in tf_view["budgeted"] if p["point"]["kind"] == "sweep") == 39
    assert {"kind": "budget", "value": 20.0} in [p["point"] for p in tf_view["budgeted"]]
    assert int8["latency_ms"]["adaptive"]["p50"] == pytest.approx(0.2)
    assert int8["throughput_ips"]["adaptive"] == 1500.0
    assert [e["accuracy"] for e in int8["exits"]] == [0.5, 1.0]


def test_the_order_of_runtimes_changes_nothing():
    """--runtimes=litert_int8,tf gives the report --runtimes=tf,litert_int8 gives."""
    forward = report.build(_compared(("tf", "litert_int8")))
    backward = report.build(_compared(("litert_int8", "tf")))
    assert backward["runtimes"] == forward["runtimes"] == ["tf", "litert_int8"]
    assert json.dumps(backward) == json.dumps(forward)
    assert report.markdown(_compared(("litert_int8", "tf"))) == report.markdown(_compared())


def test_an_exact_budget_keeps_its_path_and_its_accuracy_on_the_plot(tmp_path):
    """A budget of 1681.234 M is timed as budget@1681.234, and the plot finds its accuracy."""
    compared = _compared(budget=1681.234)
    view = report.build(compared)["models"][0]["runtimes"]["tf"]
    assert "budget@1681.234" in view["latency_ms"]
    assert report._path_accuracy(compared, "tf", "ranet", points.budget(1681.234)) == 1.0
    assert "| budget 1681.234 M |" in report.markdown(compared)


def test_markdown_and_files(tmp_path):
    compared = _compared()
    text = report.markdown(compared)
    assert "| ranet | tf | adaptive | 2.00 | 3.00 | 4.00 | 2.00 |  |  |  | 180 |" in text
    assert "| ranet | litert_int8 | adaptive | 0.20 | 1.20 | 2.20 | 0.20 |  |  |  | 1500 |" in text
    assert "| budget 20 M | 15.00 | 75.00% | 75.00% | 0.750, 0.250 | 0.600, -inf |" in text
    assert "## ranet: operating points (litert_int8)" in text
    assert "| exit | MMACs | tf | litert_int8 |" in text
    content, written = report.write(compared, str(tmp_path))
    assert {p.rsplit("/", 1)[1] for p in written} == {
        "report.json", "report.md", "accuracy_vs_macs.png", "accuracy_vs_latency.png",
        "anytime.png", "budgeted_macs.png"}
    assert json.loads((tmp_path / "report.json").read_text()) == json.loads(
        json.dumps(content))
    assert (tmp_path / "tensorboard" / "ranet").is_dir()


def test_overhead_of_the_timed_images_by_hand():
    """The default point (T1 = 0.9) sends image 0 out at exit 1 and images 1-3 to exit 2; with
    1 ms up to exit 1 and 3 ms up to exit 2, free hand-offs would take 0.25 x 1 + 0.75 x 3 =
    2.5 ms; the path's mean of 2.75 ms is 1.1x that, in report.json and report.md."""
    compared = _compared(runtimes=("tf",))
    result = compared.results["tf"]["ranet"]

    def stats(mean):
        return LatencyStats(p50=mean, p90=mean, p99=mean, mean=mean, num_samples=4)

    timed = {points.up_to_exit(1): stats(1.0), points.up_to_exit(2): stats(3.0),
             points.DEFAULT: stats(2.75)}
    default = {points.DEFAULT: result.evaluation.default.point.thresholds}
    overhead = comparison.overheads(result.evaluation, timed, default, num_timed=4,
                                    routes={points.DEFAULT: 1})
    assert overhead[points.DEFAULT].exit_fractions == (0.25, 0.75)
    assert overhead[points.DEFAULT].route == 1
    assert overhead[points.DEFAULT].expected_ms == pytest.approx(2.5)
    assert overhead[points.DEFAULT].overhead == pytest.approx(1.1)
    # Only the first two timed images: image 0 at exit 1, image 1 at exit 2.
    halves = comparison.overheads(result.evaluation, timed, default, num_timed=2)
    assert halves[points.DEFAULT].exit_fractions == (0.5, 0.5)
    compared.results["tf"]["ranet"] = comparison.ModelResult(
        result.evaluation, timed, result.throughput, overhead)
    view = report.build(compared)["models"][0]["runtimes"]["tf"]["latency_ms"]
    assert view["adaptive"]["expected_ms"] == pytest.approx(2.5)
    assert view["adaptive"]["exit_fractions"] == [0.25, 0.75]
    assert "overhead" not in view["exit_1"]
    assert view["adaptive"]["route"] == 1
    assert "| ranet | tf | adaptive | 2.75 | 2.75 | 2.75 | 2.75 | 2.50 | 1.10x | s=1 |" in \
        report.markdown(compared)


def test_one_report_folder_per_latency_block():
    assert report.report_dirs("/r", [1]) == {1: "/r"}
    assert report.report_dirs("/r", [1, 10]) == {1: "/r/latency_block1",
                                                 10: "/r/latency_block10"}


# A second model with exits on the same four images: exit 1 (5 M) right on images 1 and 3,
# exit 2 (25 M) on images 0, 1 and 2.
MSDNET_EXITS = [[[0.3, 0.7], [0.1, 0.9], [0.95, 0.05], [0.6, 0.4]],
                [[0.8, 0.2], [0.3, 0.7], [0.4, 0.6], [0.1, 0.9]]]
MSDNET_COST = costs.ModelCost("msdnet", 1, [costs.ExitCost(1, 5_000_000, 1),
                                            costs.ExitCost(2, 25_000_000, 1)])
# Right on images 0, 1 and 3 at 40 M.
VGG16_EXITS = [[[0.9, 0.1], [0.2, 0.8], [0.9, 0.1], [0.9, 0.1]]]
VGG16_COST = costs.ModelCost("vgg16", 1, [costs.ExitCost(1, 40_000_000, 1)])


def _two_with_exits(runtimes=("tf", "litert_int8")):
    """RANet, MSDNet and VGG16 matched as ``compare`` matches them, every path it would time
    given a p50 (RANet's default point 2 ms, MSDNet's 3 ms)."""
    images = hand_images()
    models = {"ranet": (np.array([EXIT_1, EXIT_2]), COST),
              "msdnet": (np.array(MSDNET_EXITS), MSDNET_COST),
              "vgg16": (np.array(VGG16_EXITS), VGG16_COST)}
    options = comparison.ComparisonOptions(model_dir=tuple(f"/runs/{m}" for m in models),
                                           batch_size=16, runtimes=tuple(runtimes))
    # int8 calibrates on other outputs (image 0's twice), so its thresholds differ.
    calibration_images = {"tf": [0, 1, 2, 3], "litert_int8": [0, 0, 2, 3]}
    evaluations = {runtime: {name: evaluation.evaluate_exits(
        probabilities[:, calibration_images[runtime]], probabilities, cost, images, name=name,
        model_dir=f"/runs/{name}", checkpoint="ckpt-1", budgets_mflops=(20,))
        for name, (probabilities, cost) in models.items()} for runtime in options.runtimes}
    at_equal_accuracy, at_equal_budget, timed = comparison.match_models(evaluations,
                                                                        HAND_LABELS)
    p50 = {"ranet": 2.0, "msdnet": 3.0, "vgg16": 4.0}

    def stats(name, path):
        value = p50[name] + (path != points.DEFAULT)
        return LatencyStats(p50=value, p90=value, p99=value, mean=value, num_samples=4)
    return comparison.Comparison(
        options=options, images=images,
        models=[loaded(name, evaluations["tf"][name]) for name in models],
        results={runtime: {name: comparison.ModelResult(
            evaluations[runtime][name],
            {path: stats(name, path) for path in [points.FULL, *timed[runtime, name]]},
            {16: {}}) for name in models} for runtime in options.runtimes},
        at_equal_accuracy=at_equal_accuracy, at_equal_budget=at_equal_budget)


def test_two_models_with_exits_are_matched_at_equal_budget(tmp_path):
    compared = _two_with_exits()
    content = report.build(compared)
    assert content["adaptive_models"] == ["ranet", "msdnet"]
    for runtime in ("tf", "litert_int8"):
        # Each model with exits against the baseline, and the first against the second.
        assert list(content["at_equal_accuracy"][runtime]) == [
            "ranet vs vgg16", "msdnet vs vgg16", "ranet vs msdnet"]
        assert list(content["at_equal_budget"][runtime]) == ["ranet vs msdnet"]
        views = {m["name"]: m["runtimes"][runtime] for m in content["models"]}
        # Both models' points at VGG16's accuracy are timed.
        for name in ("ranet", "msdnet"):
            (entry,) = content["at_equal_accuracy"][runtime][f"{name} vs vgg16"]
            assert entry["points"][name]["path"] in views[name]["latency_ms"]
        msdnet_points = {p["expected_macs"] for p in views["msdnet"]["budgeted"]} | {
            views["msdnet"]["default"]["expected_macs"]}
        budgets = content["at_equal_budget"][runtime]["ranet vs msdnet"]
        # One entry per distinct point of MSDNet, at its cost as its own view gives it.
        assert [e["macs"] for e in budgets] == sorted(msdnet_points)
        for entry in budgets:
            assert entry["points"]["msdnet"]["expected_macs"] == entry["macs"]
            if entry["points"]["ranet"] is not None:
                assert entry["points"]["ranet"]["expected_macs"] <= entry["macs"]

    # On TensorFlow's outputs, by hand: MSDNet's points cost 5, 10, 15, 20 and 25 M; RANet's
    # cheapest costs 15 M (T1 = 0.6: images 0, 1 and 2 leave at exit 1, image 1 wrong).
    budgets = content["at_equal_budget"]["tf"]["ranet vs msdnet"]
    assert [e["macs"] / 1e6 for e in budgets] == [5, 10, 15, 20, 25]
    assert [e["reason"] for e in budgets[:2]] == [
        "no ranet point costs at most 5.00 M multiply-adds; its cheapest costs 15.00 M",
        "no ranet point costs at most 10.00 M multiply-adds; its cheapest costs 15.00 M"]
    # At MSDNet's default (25 M, right on images 0-2), RANet's T1 = 0.9 (25 M) is right on
    # all four: one image apart, d = 0.25, var = (1 - 4 x 0.0625) / 16. Both are the default
    # points, timed: 3 ms / 2 ms.
    top = budgets[-1]
    assert top["accuracy"] == {"ranet": 1.0, "msdnet": 0.75}
    assert top["points"]["ranet"]["thresholds"] == [0.9, "-inf"]
    half = 1.959963984540054 * np.sqrt(0.75) / 4
    assert top["difference_ci95"] == pytest.approx([0.25 - half, 0.25 + half])
    assert top["points"]["ranet"]["path"] == top["points"]["msdnet"]["path"] == "adaptive"
    assert top["latency_ratio_p50"] == 1.5
    verdict = content["verdict"]["tf"]["ranet vs msdnet"]
    assert verdict["text"] == ("ranet vs msdnet (tf): ranet leads at 0 of 5 budgets, msdnet "
                               "at 0, 3 within the interval, 2 cheaper than any ranet point "
                               "(5.0-10.0 MMACs)")
    assert verdict["unmatched"] == [5e6, 10e6]

    text = report.markdown(compared)
    assert "| tf | ranet | vgg16 | 75.00% |" in text and "| tf | msdnet | vgg16 | 75.00% |" in text
    assert "## ranet vs msdnet" in text and f"- {verdict['text']}" in text
    assert "- ranet vs msdnet (litert_int8): " in text
    assert "### ranet vs msdnet (litert_int8)" in text
    assert ("| default | 25.00 | 75.00% | q=1.05 | 25.00 | 100.00% | +25.00 [-17.43, +67.43] "
            "|") in text
    assert "| budget 20 M | 5.00 | 50.00% | none cheap enough |" in text

    _, written = report.write(compared, str(tmp_path))
    assert {"anytime.png", "budgeted_macs.png"} <= {p.rsplit("/", 1)[1] for p in written}
    scalars = event_scalars(tmp_path / "tensorboard", "ranet")
    assert scalars["tf/at_equal_budget/msdnet/accuracy_difference"][25_000] == \
        pytest.approx(0.25)


def test_the_order_of_runtimes_changes_nothing_with_two_models_with_exits():
    forward, backward = _two_with_exits(), _two_with_exits(("litert_int8", "tf"))
    assert json.dumps(report.build(backward)) == json.dumps(report.build(forward))
    assert report.markdown(backward) == report.markdown(forward)

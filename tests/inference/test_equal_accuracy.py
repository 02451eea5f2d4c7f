"""ranet.inference.equal_accuracy: the paired interval, the point chosen against a baseline,
and what report.json and report.md say of it, all computed by hand."""

import dataclasses
import json
import math
from types import SimpleNamespace

import numpy as np
import pytest

from ranet import costs
from ranet.inference import comparison, equal_accuracy, evaluation, points, report
from ranet.inference.latency import LatencyStats
from ranet.inference.points import Kind
from helpers import HAND_COST, HAND_EXIT_1, HAND_EXIT_2, HAND_LABELS, hand_images, loaded

PROBABILITIES = np.array([HAND_EXIT_1, HAND_EXIT_2])
CONFIDENCES = PROBABILITIES.max(axis=-1)
PREDICTIONS = PROBABILITIES.argmax(axis=-1)
EXIT_MACS = [e.macs for e in HAND_COST.exits]   # 10 M, 30 M
INF = math.inf


def _point(threshold):
    return equal_accuracy.candidate(points.fixed(threshold), [threshold, -INF], CONFIDENCES,
                                    PREDICTIONS, HAND_LABELS, EXIT_MACS)


def test_paired_interval_by_hand():
    a = np.array([1, 1, 1, 1, 0, 0, 0, 0, 1, 1], bool)
    b = np.array([1, 0, 0, 0, 0, 0, 1, 0, 1, 1], bool)
    # Only a right: 3 images, only b right: 1; d = 0.2, var = (3 + 1 - 10 * 0.04) / 100.
    half = 1.959963984540054 * math.sqrt(3.6) / 10
    assert equal_accuracy.paired_difference_interval(a, b) == pytest.approx((0.2 - half,
                                                                             0.2 + half))
    # Same answers: no difference and no doubt about it.
    assert equal_accuracy.paired_difference_interval(a, a) == (0.0, 0.0)
    with pytest.raises(ValueError, match="same images"):
        equal_accuracy.paired_difference_interval(a, b[:5])


def test_candidates_score_each_image_at_the_exit_it_takes():
    # Exit 1 is confident on images 0 (0.9, right) and 1 (0.8, wrong); exit 2 is always right.
    at_085, at_075, everyone_first = _point(0.85), _point(0.75), _point(-INF)
    assert at_085.correct.tolist() == [True, True, True, True]
    assert at_085.expected_macs == (10e6 + 3 * 30e6) / 4
    assert at_075.correct.tolist() == [True, False, True, True]
    assert at_075.expected_macs == 20e6
    assert everyone_first.correct.tolist() == [True, False, True, False]
    assert everyone_first.expected_macs == 10e6


def _baseline(correct, macs=40_000_000):
    """A one-exit model's pass as the one point it has."""
    return equal_accuracy.Candidate(points.FULL, (), float(macs), np.array(correct, bool))


VS_VGG16 = equal_accuracy.Pair("ranet", "vgg16")


def test_the_cheapest_point_at_least_as_accurate_is_chosen():
    pool = [_point(-INF), _point(0.75), _point(0.85)]
    baseline = _baseline([True, True, False, True])   # 75%, 40 M
    chosen = equal_accuracy.cheapest_as_accurate(pool, baseline)
    assert chosen is pool[1]
    matched = equal_accuracy.Match(VS_VGG16, baseline, chosen)
    assert matched.reaches and matched.macs_ratio == 2.0 and matched.difference == 0.0
    # One image each gets right alone: d = 0, var = 2 / 16.
    half = 1.959963984540054 * math.sqrt(2) / 4
    assert matched.difference_ci95 == pytest.approx((-half, half))
    # A perfect baseline: only the 0.85 point (25 M) reaches it.
    assert equal_accuracy.cheapest_as_accurate(pool, _baseline(np.ones(4))) is pool[2]


def test_when_no_point_reaches_the_most_accurate_one_says_by_how_much():
    pool = [_point(-INF), _point(0.75)]
    perfect = _baseline(np.ones(4))
    matched = equal_accuracy.Match(VS_VGG16, perfect,
                                   equal_accuracy.cheapest_as_accurate(pool, perfect))
    assert not matched.reaches and matched.point is pool[1]
    entry = equal_accuracy.to_json(matched, {"p50": 1.0, "p90": 2.0}, {"p50": 3.0, "p90": 5.0})
    assert entry["difference"] == pytest.approx(-0.25)
    assert entry["accuracy"] == {"ranet": 0.75, "vgg16": 1.0}
    assert (entry["latency_ratio_p50"], entry["latency_ratio_p90"]) == (3.0, 2.5)
    assert entry["latency_ms"] == {"ranet": {"p50": 1.0, "p90": 2.0},
                                   "vgg16": {"p50": 3.0, "p90": 5.0}}
    low, high = entry["difference_ci95"]
    assert low < -0.25 < high
    # Without the baseline's latency, no ratio.
    assert equal_accuracy.to_json(matched, {"p50": 1.0, "p90": 2.0}, None)[
        "latency_ratio_p50"] is None


def test_a_candidate_costs_what_the_report_says_its_point_costs():
    """The same expected multiply-adds to the bit, so that budgets compare as numbers."""
    result = evaluation.evaluate_exits(PROBABILITIES, PROBABILITIES, HAND_COST, hand_images(),
                                       name="ranet", model_dir="", checkpoint="")
    scored = equal_accuracy.calibrated_candidates(result, HAND_LABELS)
    assert [c.point_id for c in scored] == list(result.points)
    assert [(c.expected_macs, c.accuracy) for c in scored] == [
        (r.point.expected_macs, r.point.accuracy) for r in result.points.values()]


def test_identical_thresholds_are_one_point_cheapest_first():
    first, same, cheaper = _point(0.85), _point(0.85), _point(0.75)
    assert equal_accuracy.distinct([first, same, cheaper]) == [cheaper, first]


def test_the_last_exit_alone_is_always_a_candidate():
    result = evaluation.evaluate_exits(PROBABILITIES, PROBABILITIES, HAND_COST, hand_images(),
                                       name="ranet", model_dir="", checkpoint="",
                                       budgets_mflops=(20,))
    ids = [c.point_id for c in equal_accuracy.candidates_of(result, HAND_LABELS)]
    assert ids[-1] == points.LAST_EXIT
    assert points.DEFAULT in ids and points.budget(20) in ids
    assert sum(point.kind == Kind.SWEEP for point in ids) == 39


def test_a_point_already_timed_reuses_its_path():
    result = evaluation.evaluate_exits(PROBABILITIES, PROBABILITIES, HAND_COST, hand_images(),
                                       name="ranet", model_dir="", checkpoint="")
    baseline = SimpleNamespace(name="vgg16", report_predictions=np.array([[0, 1, 0, 0]]),
                               cost=SimpleNamespace(exits=[SimpleNamespace(macs=313e6)]))

    def matched(timed):
        (only,) = equal_accuracy.against_baselines(result, [baseline], HAND_LABELS,
                                                   timed)[VS_VGG16]
        return only
    chosen = matched(result.timed_points)
    # 75% is reached cheapest by letting exit 1 answer images 0, 1 and 2 (confidence >= 0.6;
    # image 1 wrong there): 3 x 10 M + 30 M over 4 images.
    assert chosen.point.expected_macs == 15e6 and chosen.point.accuracy == 0.75
    assert chosen.target_path == points.FULL and chosen.target.expected_macs == 313e6
    assert matched({points.DEFAULT: list(chosen.point.thresholds)}).path == points.DEFAULT
    assert matched({}).path == points.equal("vgg16")


def _comparison():
    images = hand_images()
    ranet = evaluation.evaluate_exits(PROBABILITIES, PROBABILITIES, HAND_COST, images,
                                      name="ranet", model_dir="/runs/ranet", checkpoint="c")
    # Right on images 0, 1 and 3: 75%, at 40 M.
    vgg16_probabilities = np.array([[[0.9, 0.1], [0.2, 0.8], [0.9, 0.1], [0.9, 0.1]]])
    vgg16 = evaluation.evaluate_exits(
        vgg16_probabilities, vgg16_probabilities,
        costs.ModelCost("vgg16", 1, [costs.ExitCost(1, 40_000_000, 1)]), images, name="vgg16",
        model_dir="", checkpoint="")
    at_equal_accuracy, at_equal_budget, _ = comparison.match_models(
        {"tf": {"ranet": ranet, "vgg16": vgg16}}, HAND_LABELS)
    path = at_equal_accuracy["tf"][VS_VGG16][0].path

    def stats(p50):
        return LatencyStats(p50=p50, p90=2 * p50, p99=3 * p50, mean=p50, num_samples=4)

    return comparison.Comparison(
        options=comparison.ComparisonOptions(model_dir=("/runs/ranet",), batch_size=16),
        images=images, models=[loaded("ranet", ranet), loaded("vgg16", vgg16)],
        results={"tf": {
            "ranet": comparison.ModelResult(ranet, {points.FULL: stats(3.0),
                                                    points.DEFAULT: stats(2.0),
                                                    path: stats(1.0)}, {16: {}}),
            "vgg16": comparison.ModelResult(vgg16, {points.FULL: stats(4.0)}, {16: {}})}},
        at_equal_accuracy=at_equal_accuracy, at_equal_budget=at_equal_budget)


def test_report_json_markdown_and_plot_carry_it(tmp_path):
    compared = _comparison()
    content = report.build(compared)
    assert content["adaptive_models"] == ["ranet"]
    (entry,) = content["at_equal_accuracy"]["tf"]["ranet vs vgg16"]
    assert {"macs", "points", "accuracy", "reaches", "difference", "difference_ci95",
            "macs_ratio", "latency_ms", "latency_ratio_p50", "latency_ratio_p90",
            "reason"} == set(entry)
    assert entry["reaches"] and entry["accuracy"] == {"ranet": 0.75, "vgg16": 0.75}
    assert entry["points"]["vgg16"] == {"point": {"kind": "full"}, "label": "every exit",
                                        "path": "full", "thresholds": [],
                                        "expected_macs": 40e6}
    assert entry["points"]["ranet"]["expected_macs"] == entry["macs"] / entry["macs_ratio"]
    assert entry["macs_ratio"] == pytest.approx(40 / 15)      # 40 M / 15 M
    assert entry["latency_ratio_p50"] == 4.0                  # 4 ms / 1 ms
    assert entry["latency_ratio_p90"] == 4.0                  # 8 ms / 2 ms
    # One adaptive model: nothing to contest at equal budget.
    assert content["at_equal_budget"] == {"tf": {}} and content["verdict"] == {"tf": {}}
    text = report.markdown(compared)
    assert "## At equal accuracy" in text
    assert "| tf | ranet | vgg16 | 75.00% |" in text
    assert "| 2.67x | 4.00 / 1.00 | 4.00x | 4.00x |" in text
    report.write(compared, str(tmp_path))
    assert json.loads((tmp_path / "report.json").read_text())["at_equal_accuracy"] == \
        json.loads(json.dumps(content["at_equal_accuracy"]))
    assert (tmp_path / "accuracy_vs_latency.png").stat().st_size > 0


def test_markdown_says_when_no_point_reaches_the_baseline():
    compared = _comparison()
    (matched,) = compared.at_equal_accuracy["tf"][VS_VGG16]
    # A perfect baseline against the chosen point's 75%.
    compared.at_equal_accuracy["tf"][VS_VGG16] = [
        dataclasses.replace(matched, target=_baseline(np.ones(4)))]
    text = report.markdown(compared)
    assert ("- tf, ranet vs vgg16: no ranet point reaches 100.00%; its most accurate is 25.00 "
            "points below, where it answers 4.00x as fast (p50).") in text

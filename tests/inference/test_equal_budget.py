"""ranet.inference.equal_budget: the most accurate point at no more multiply-adds, the paired
interval there and the verdict line, all computed by hand on ten images."""

import math

import numpy as np
import pytest

from ranet.inference import equal_accuracy, equal_budget, points
from ranet.inference.equal_accuracy import Candidate, Pair
from ranet.inference.equal_budget import Outcome

Z = 1.959963984540054
PAIR = Pair("ranet", "msdnet")


def _point(point_id, mmacs, right):
    """A point right on the images ``right`` (indices among ten), at ``mmacs`` M."""
    correct = np.zeros(10, bool)
    correct[list(right)] = True
    # Distinct thresholds per point: nothing here reads them but ``distinct``.
    return Candidate(point_id, (float(mmacs), -math.inf), mmacs * 1e6, correct)


# RANet: 60% at 10 M, 90% at 20 M, every image at 40 M (its last exit alone).
RANET = [_point(points.sweep(0.5), 10, range(6)), _point(points.sweep(1.0), 20, range(9)),
         _point(points.LAST_EXIT, 40, range(10))]
# MSDNet's points, one per case.
CHEAPER_THAN_ALL = _point(points.sweep(0.05), 5, range(3))
TRAILS = _point(points.sweep(0.3), 15, range(10))        # RANet's 10 M point: 60% vs 100%
LEADS = _point(points.budget(25), 25, range(2))          # RANet's 20 M point: 90% vs 20%
WITHIN = _point(points.DEFAULT, 40, range(9))            # RANet's 40 M point: 100% vs 90%


def _matches(*targets):
    return equal_budget.at_equal_budget(PAIR, RANET, list(targets), {}, {})


def test_the_best_point_at_no_more_macs_and_where_it_leads():
    """At 25 M the answer is RANet's 20 M point (90%), a point it has, not the 92.5% a line
    from 20 M to 40 M would give; 7 images only RANet gets right, none only MSDNet:
    d = 0.7, var = (7 - 10 x 0.49) / 100."""
    (matched,) = _matches(LEADS)
    assert matched.point is RANET[1] and matched.point.accuracy == 0.9
    half = Z * math.sqrt(2.1) / 10
    assert matched.difference_ci95 == pytest.approx((0.7 - half, 0.7 + half))
    assert matched.difference_ci95[0] > 0 and equal_budget.outcome(matched) == Outcome.LEADS


def test_where_the_other_model_leads():
    """At 15 M RANet's best is its 10 M point (60%) against MSDNet's 100%: 4 images only
    MSDNet gets right; d = -0.4, var = (4 - 10 x 0.16) / 100."""
    (matched,) = _matches(TRAILS)
    assert matched.point is RANET[0]
    half = Z * math.sqrt(2.4) / 10
    assert matched.difference_ci95 == pytest.approx((-0.4 - half, -0.4 + half))
    assert matched.difference_ci95[1] < 0 and equal_budget.outcome(matched) == Outcome.TRAILS


def test_a_point_as_expensive_counts_and_the_interval_can_span_zero():
    """At exactly 40 M RANet's 40 M point is admitted: 100% vs 90%, one image apart;
    d = 0.1, var = (1 - 10 x 0.01) / 100."""
    (matched,) = _matches(WITHIN)
    assert matched.point is RANET[2]
    half = Z * math.sqrt(0.9) / 10
    low, high = matched.difference_ci95
    assert (low, high) == pytest.approx((0.1 - half, 0.1 + half)) and low < 0 < high
    assert equal_budget.outcome(matched) == Outcome.WITHIN


def test_a_budget_cheaper_than_every_point_has_no_answer_and_says_why():
    (matched,) = _matches(CHEAPER_THAN_ALL)
    assert matched.point is None and matched.difference_ci95 is None
    assert matched.reason == ("no ranet point costs at most 5.00 M multiply-adds; its "
                              "cheapest costs 10.00 M")
    assert equal_budget.outcome(matched) == Outcome.UNMATCHED
    entry = equal_accuracy.to_json(matched, None, {"p50": 2.0, "p90": 3.0})
    assert entry["macs"] == 5e6
    assert entry["points"]["ranet"] is None and entry["accuracy"] == {"ranet": None,
                                                                      "msdnet": 0.3}
    assert (entry["difference"], entry["difference_ci95"], entry["macs_ratio"]) == (
        None, None, None)
    assert entry["reason"] == matched.reason and entry["latency_ratio_p50"] is None
    assert entry["points"]["msdnet"]["label"] == "q=0.05"


def test_ties_in_accuracy_go_to_the_cheaper_point():
    twin = _point(points.sweep(0.9), 18, range(9))   # RANet's 20 M accuracy at 18 M
    assert equal_budget.best_within(RANET + [twin], LEADS) is twin


def test_each_side_carries_the_path_that_timed_its_point():
    timed = {RANET[1].thresholds: points.DEFAULT}
    (matched,) = equal_budget.at_equal_budget(PAIR, RANET, [LEADS], timed,
                                              {LEADS.thresholds: points.budget(25)})
    assert (matched.path, matched.target_path) == (points.DEFAULT, points.budget(25))
    entry = equal_accuracy.to_json(matched, {"p50": 1.0, "p90": 2.0},
                                   {"p50": 3.0, "p90": 4.0})
    assert entry["points"]["ranet"]["path"] == "adaptive"
    assert entry["points"]["msdnet"]["point"] == {"kind": "budget", "value": 25.0}
    assert entry["latency_ratio_p50"] == 3.0
    assert entry["macs_ratio"] == 25 / 20


@pytest.mark.parametrize("target, line", [
    (LEADS, "ranet vs msdnet (tf): ranet leads at 1 of 1 budgets (25.0 MMACs), msdnet at 0, "
            "0 within the interval"),
    (TRAILS, "ranet vs msdnet (tf): ranet leads at 0 of 1 budgets, msdnet at 1 (15.0 MMACs), "
             "0 within the interval"),
    (WITHIN, "ranet vs msdnet (tf): ranet leads at 0 of 1 budgets, msdnet at 0, 1 within the "
             "interval"),
    (CHEAPER_THAN_ALL, "ranet vs msdnet (tf): ranet leads at 0 of 1 budgets, msdnet at 0, 0 "
                       "within the interval, 1 cheaper than any ranet point (5.0 MMACs)"),
])
def test_the_verdict_of_each_case(target, line):
    assert equal_budget.verdict("tf", PAIR, _matches(target)).text == line


def test_the_verdict_over_every_budget_cheapest_first():
    verdict = equal_budget.verdict("litert", PAIR,
                                   _matches(WITHIN, LEADS, CHEAPER_THAN_ALL, TRAILS))
    assert verdict.text == ("ranet vs msdnet (litert): ranet leads at 1 of 4 budgets (25.0 "
                            "MMACs), msdnet at 1 (15.0 MMACs), 1 within the interval, 1 "
                            "cheaper than any ranet point (5.0 MMACs)")
    assert verdict.to_json() == {
        "text": verdict.text, "budgets": 4,
        "leads": {"ranet": [25e6], "msdnet": [15e6]}, "within": [40e6], "unmatched": [5e6]}


def test_ranges_never_span_a_budget_with_another_outcome():
    """Leads at 10 and 15 M, not at 20 M, again at 30 M: two runs, not 10-30."""
    verdict = equal_budget.Verdict("tf", PAIR, (
        (10e6, Outcome.LEADS), (15e6, Outcome.LEADS), (20e6, Outcome.WITHIN),
        (30e6, Outcome.LEADS), (40e6, Outcome.TRAILS), (120e6, Outcome.TRAILS)))
    assert verdict.text == ("ranet vs msdnet (tf): ranet leads at 3 of 6 budgets (10.0-15.0, "
                            "30.0 MMACs), msdnet at 2 (40.0-120.0 MMACs), 1 within the "
                            "interval")

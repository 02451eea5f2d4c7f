"""Threshold calibration against hand-computed tables and a loop transcription of the reference."""

import math

import numpy as np
import pytest

from ranet.inference import calibration

# K = 3 exits, N = 10 images, distinct confidences per exit. Image 0 is very confident at
# exit 2 (0.88) but leaves at exit 1 in every case below, so it must not count at exit 2.
CONFIDENCES = np.array([
    [0.95, 0.30, 0.80, 0.10, 0.60, 0.20, 0.90, 0.40, 0.70, 0.50],
    [0.88, 0.85, 0.25, 0.75, 0.35, 0.65, 0.45, 0.55, 0.05, 0.92],
    [0.50, 0.40, 0.30, 0.20, 0.10, 0.15, 0.25, 0.35, 0.45, 0.55],
])
LABELS = np.array([0, 1, 2, 0, 1, 2, 0, 1, 2, 0])
# Predictions at the exits an image does NOT leave from are often right (and the ones at
# its exit often wrong), so reading the wrong exit changes the accuracy.
PREDICTIONS = np.array([
    [0, 0, 2, 0, 0, 0, 1, 1, 0, 0],
    [1, 1, 0, 1, 0, 0, 0, 0, 0, 1],
    [2, 2, 1, 0, 1, 2, 2, 0, 2, 0],
])
EXIT_MACS = np.array([10.0, 25.0, 50.0])


def _reference_thresholds(confidences, distribution):
    """A line-by-line transcription of the reference's dynamic_eval_find_threshold."""
    num_exits, num_images = confidences.shape
    sorted_idx = np.argsort(-confidences, axis=1, kind="stable")
    filtered = np.zeros(num_images)
    thresholds = np.full(num_exits, 1e8)
    for k in range(num_exits - 1):
        count = 0
        out_n = math.floor(num_images * distribution[k])
        for i in range(num_images):
            ori_idx = sorted_idx[k][i]
            if filtered[ori_idx] == 0:
                count += 1
                if count == out_n:
                    thresholds[k] = confidences[k][ori_idx]
                    break
        filtered += confidences[k] >= thresholds[k]
    thresholds[num_exits - 1] = -1e8
    return np.where(thresholds == 1e8, np.inf, np.where(thresholds == -1e8, -np.inf, thresholds))


def _reference_evaluate(confidences, predictions, labels, thresholds, exit_macs):
    """The reference's dynamic_eval_with_threshold: (accuracy, expected macs, exit counts)."""
    num_exits, num_images = confidences.shape
    correct, counts = 0, np.zeros(num_exits)
    for i in range(num_images):
        for k in range(num_exits):
            if confidences[k][i] >= thresholds[k] or k == num_exits - 1:
                correct += int(predictions[k][i] == labels[i])
                counts[k] += 1
                break
    return correct / num_images, float(counts @ exit_macs) / num_images, counts


def test_exit_distribution_is_the_reference_formula():
    for q in (0.05, 0.5, 1.0, 1.95):
        expected = np.array([q ** k for k in range(1, 5)])
        np.testing.assert_allclose(calibration.exit_distribution(q, 4),
                                   expected / expected.sum(), rtol=1e-12)
    np.testing.assert_allclose(calibration.exit_distribution(1.0, 3), [1 / 3] * 3)
    with pytest.raises(ValueError, match=r"q must be positive.*Received: q=0"):
        calibration.exit_distribution(0.0, 3)


def test_reference_sweep():
    sweep = calibration.reference_sweep()
    assert len(sweep) == 39
    assert sweep[0] == pytest.approx(0.05) and sweep[19] == 1.0 and sweep[-1] == pytest.approx(1.95)


def test_uniform_distribution_by_hand():
    # q = 1: p = 1/3 each, floor(10 / 3) = 3 leave at exits 1 and 2.
    # Exit 1: the 3 highest are 0.95 (0), 0.90 (6), 0.80 (2): T1 = 0.80.
    # Exit 2, among 1 3 4 5 7 8 9: 0.92 (9), 0.85 (1), 0.75 (3): T2 = 0.75
    # (0.85 if image 0, already gone, were wrongly counted).
    thresholds = calibration.thresholds_for_distribution(CONFIDENCES, calibration.exit_distribution(1.0, 3))
    np.testing.assert_array_equal(thresholds, [0.80, 0.75, -np.inf])
    # Exits: 1 -> {0, 2, 6}; 2 -> {1, 3, 9}; 3 -> {4, 5, 7, 8}.
    np.testing.assert_array_equal(calibration.exit_indices(CONFIDENCES, thresholds),
                                  [0, 1, 0, 1, 2, 2, 0, 2, 2, 1])
    point = calibration.evaluate(CONFIDENCES, PREDICTIONS, LABELS, thresholds, EXIT_MACS)
    # Right: 0 and 2 at exit 1, 1 at exit 2, 4 5 8 at exit 3.
    assert point.accuracy == pytest.approx(0.6)
    assert point.exit_fractions == pytest.approx((0.3, 0.3, 0.4))
    assert point.expected_macs == pytest.approx(0.3 * 10 + 0.3 * 25 + 0.4 * 50)  # 30.5
    # Class 0 = {0, 3, 6, 9}, class 1 = {1, 4, 7}, class 2 = {2, 5, 8}.
    np.testing.assert_allclose(point.exit_fractions_per_class,
                               [[0.5, 0.5, 0], [0, 1 / 3, 2 / 3], [1 / 3, 0, 2 / 3]])
    assert point.thresholds == (0.80, 0.75, -np.inf)


def test_geometric_distribution_by_hand():
    # q = 0.5: p = (4, 2, 1) / 7; floor(10 * 4/7) = 5, floor(10 * 2/7) = 2.
    # Exit 1: 5th highest is 0.60 (4), so {0, 2, 4, 6, 8} leave.
    # Exit 2, among 1 3 5 7 9: 0.92 (9), 0.85 (1): T2 = 0.85; image 0 (0.88) has gone.
    thresholds = calibration.thresholds_for_distribution(CONFIDENCES, calibration.exit_distribution(0.5, 3))
    np.testing.assert_array_equal(thresholds, [0.60, 0.85, -np.inf])
    point = calibration.evaluate(CONFIDENCES, PREDICTIONS, LABELS, thresholds, EXIT_MACS)
    # Right: 0 2 at exit 1; 1 at exit 2; 3 5 at exit 3.
    assert point.accuracy == pytest.approx(0.5)
    assert point.exit_fractions == pytest.approx((0.5, 0.2, 0.3))
    assert point.expected_macs == pytest.approx(25.0)


def test_tiny_q_sends_all_but_one_image_to_exit_1_and_it_skips_to_the_last():
    # p_1 = 1 - 1e-6 - ...: floor(10 p_1) = 9, so T1 is the 2nd lowest confidence (0.20) and
    # only image 3 (0.10) stays; floor(10 p_2) = 0 so T2 = +inf: it goes to the LAST exit.
    thresholds = calibration.thresholds_for_distribution(CONFIDENCES, calibration.exit_distribution(1e-6, 3))
    np.testing.assert_array_equal(thresholds, [0.20, np.inf, -np.inf])
    point = calibration.evaluate(CONFIDENCES, PREDICTIONS, LABELS, thresholds, EXIT_MACS)
    assert point.exit_fractions == pytest.approx((0.9, 0.0, 0.1))
    assert point.expected_macs == pytest.approx(14.0)


def test_quota_beyond_the_images_left_means_nobody_leaves():
    # Ties at T1 let 8 images leave where 5 were asked for; exit 2 then wants 4 of the 2 left.
    confidences = np.array([[0.9] * 8 + [0.1] * 2, [0.5] * 10, [0.5] * 10])
    thresholds = calibration.thresholds_for_distribution(confidences, [0.5, 0.4, 0.1])
    np.testing.assert_array_equal(thresholds, [0.9, np.inf, -np.inf])
    np.testing.assert_array_equal(np.bincount(calibration.exit_indices(confidences, thresholds)),
                                  [8, 0, 2])


@pytest.mark.parametrize("seed", range(5))
def test_calibrate_and_evaluate_equal_the_reference_loops(seed):
    rng = np.random.default_rng(seed)
    num_exits, num_images = 4, 300
    # Rounding makes ties, within and across exits.
    confidences = np.round(rng.uniform(0.1, 1.0, (num_exits, num_images)), 2).astype(np.float32)
    predictions = rng.integers(0, 10, (num_exits, num_images))
    labels = rng.integers(0, 10, num_images)
    exit_macs = np.cumsum(rng.uniform(1e6, 5e6, num_exits))
    for q in (1e-3, 0.05, 0.3, 0.75, 1.0, 1.4, 1.95, 5.0):
        distribution = calibration.exit_distribution(q, num_exits)
        thresholds = calibration.thresholds_for_distribution(confidences, distribution)
        np.testing.assert_array_equal(thresholds, _reference_thresholds(confidences, distribution))
        point = calibration.evaluate(confidences, predictions, labels, thresholds, exit_macs)
        accuracy, expected_macs, counts = _reference_evaluate(confidences, predictions, labels,
                                                              thresholds, exit_macs)
        assert point.accuracy == pytest.approx(accuracy)
        assert point.expected_macs == pytest.approx(expected_macs)
        np.testing.assert_allclose(point.exit_fractions, counts / num_images)


def test_evaluate_per_class_rows_for_every_class_and_input_checks():
    thresholds = calibration.fixed_threshold(0.5, 3)
    point = calibration.evaluate(CONFIDENCES, PREDICTIONS, LABELS, thresholds, EXIT_MACS,
                                 num_classes=5)
    assert len(point.exit_fractions_per_class) == 5
    assert point.exit_fractions_per_class[4] == (0.0, 0.0, 0.0)  # no images of class 4
    with pytest.raises(ValueError, match=r"predictions must have shape \(3, 10\).*Received"):
        calibration.evaluate(CONFIDENCES, PREDICTIONS[:2], LABELS, thresholds, EXIT_MACS)
    with pytest.raises(ValueError, match=r"exit_macs must have shape \(3,\).*Received"):
        calibration.evaluate(CONFIDENCES, PREDICTIONS, LABELS, thresholds, EXIT_MACS[:2])
    with pytest.raises(ValueError, match=r"labels must lie in \[0, num_classes=2\).*Received"):
        calibration.evaluate(CONFIDENCES, PREDICTIONS, LABELS, thresholds, EXIT_MACS,
                             num_classes=2)


def _points():
    """Validation points at q = 1e-6, 0.5, 1 (see the hand-computed tests above).

    (accuracy, expected macs): (0.5, 14), (0.5, 25), (0.6, 30.5).
    """
    return calibration.budgeted_points(CONFIDENCES, PREDICTIONS, LABELS, EXIT_MACS,
                                       qs=(1e-6, 0.5, 1.0))


def test_budgeted_points_are_calibrate_then_evaluate():
    points = _points()
    assert [p.accuracy for p in points] == pytest.approx([0.5, 0.5, 0.6])
    assert [p.expected_macs for p in points] == pytest.approx([14.0, 25.0, 30.5])
    assert points[2].thresholds == (0.80, 0.75, -np.inf)


def test_best_within_budget():
    points = _points()
    assert calibration.best_within_budget(points, 14.0).expected_macs == pytest.approx(14.0)
    # 25 affords the first two, equally accurate: the cheaper wins.
    assert calibration.best_within_budget(points, 25.0).expected_macs == pytest.approx(14.0)
    assert calibration.best_within_budget(points, 30.5).accuracy == pytest.approx(0.6)
    assert calibration.best_within_budget(points, 1e9).accuracy == pytest.approx(0.6)
    with pytest.raises(ValueError, match=r"No operating point fits a budget of 9.5 .*cheapest "
                                         r"costs 14.0.*Received: budget_macs=9.5"):
        calibration.best_within_budget(points, 9.5)


def test_the_all_at_exit_1_point_serves_budgets_down_to_exit_1s_cost():
    all_at_1 = calibration.evaluate(CONFIDENCES, PREDICTIONS, LABELS,
                                    calibration.fixed_threshold(-np.inf, 3), EXIT_MACS)
    assert all_at_1.expected_macs == 10.0 and all_at_1.exit_fractions == (1.0, 0.0, 0.0)
    points = [all_at_1, *_points()]
    assert calibration.best_within_budget(points, 10.0) is all_at_1
    with pytest.raises(ValueError, match="No operating point fits"):
        calibration.best_within_budget(points, 9.99)


def test_default_point_is_the_cheapest_within_one_point_of_the_last_exit():
    points = _points()
    # The last exit alone is right on 3 4 5 8 9: accuracy 0.5.
    last_exit = calibration.evaluate(CONFIDENCES, PREDICTIONS, LABELS,
                                     calibration.fixed_threshold(np.inf, 3), EXIT_MACS)
    assert last_exit.accuracy == pytest.approx(0.5)
    assert calibration.default_point(points, last_exit.accuracy).expected_macs == pytest.approx(14)
    # 0.61 - 0.01 = 0.60 exactly: the boundary counts.
    assert calibration.default_point(points, 0.61).expected_macs == pytest.approx(30.5)
    with pytest.raises(ValueError, match=r"within 0.01 of the last exit's accuracy.*best "
                                         r"reaches 0.6000.*Received: last_exit_accuracy=0.62"):
        calibration.default_point(points, 0.62)


def test_fixed_threshold():
    np.testing.assert_array_equal(calibration.fixed_threshold(0.85, 3), [0.85, 0.85, -np.inf])
    np.testing.assert_array_equal(calibration.fixed_threshold(0.85, 1), [-np.inf])
    with pytest.raises(ValueError, match="Received: num_exits=0"):
        calibration.fixed_threshold(0.85, 0)

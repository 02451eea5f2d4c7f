"""ranet.inference.evaluation: calibration kept off the reported images, operating points."""

import numpy as np
import pytest

from helpers import SYNTHETIC_DATA as SYNTHETIC
from helpers import HAND_COST as COST
from helpers import HAND_EXIT_1 as EXIT_1
from helpers import HAND_EXIT_2 as EXIT_2
from helpers import hand_images
from ranet import costs, data
from ranet.data import report_images
from ranet.inference import evaluation, points
from ranet.inference.points import Kind
from ranet.inference.serving import exporting


def test_validation_report_never_sees_its_calibration_images():
    splits = data.load_splits(SYNTHETIC)
    images = report_images.evaluation_images(splits, "validation", seed=0)
    calibration, reported = images.calibration_images, images.report_images
    assert len(calibration) + len(reported) == SYNTHETIC.validation_size
    flat = lambda x: {row.tobytes() for row in x.reshape(len(x), -1)}  # noqa: E731
    assert not flat(calibration) & flat(reported)
    assert np.bincount(images.report_labels, minlength=10).min() >= 6  # class-balanced halves


def test_missing_test_split_is_a_clear_error():
    splits = data.load_splits(SYNTHETIC)
    without_test = data.DataSplits(**{**splits.__dict__, "test": None})
    with pytest.raises(data.DataError, match="test split is missing"):
        report_images.evaluation_images(without_test, "test", seed=0)


def _hand_evaluation(**options):
    probabilities = np.array([EXIT_1, EXIT_2], np.float32)
    return evaluation.evaluate_exits(probabilities, probabilities, COST, hand_images(),
                                     name="ranet",
                                     model_dir="/runs/ranet", checkpoint="ckpt-1", **options)


def test_operating_points_match_a_hand_computation():
    result = _hand_evaluation(budgets_mflops=(20,), fixed_threshold=0.85)
    assert result.exit_accuracy == [0.5, 1.0]
    # Default: the cheapest point within 1 point of the last exit (100%): only image 0 may
    # leave early (T1 = 0.9); 0.25 x 10 M + 0.75 x 30 M.
    assert result.default.point.thresholds == (pytest.approx(0.9), -np.inf)
    assert result.default.point.accuracy == 1.0
    assert result.default.point.expected_macs == pytest.approx(25e6)
    # Within 20 M: 75% at 15 M (T1 = 0.6: three leave early, one of them wrong) beats 75% at
    # 20 M (T1 = 0.8) by being cheaper, and 50% at 10 M by accuracy.
    (budget,) = result.of_kind(Kind.BUDGET)
    assert budget.point_id == points.budget(20)
    assert budget.point.thresholds[0] == pytest.approx(0.6)
    assert (budget.point.accuracy, budget.point.expected_macs) == (0.75, pytest.approx(15e6))
    assert budget.point.exit_fractions == (0.75, 0.25)
    # The seed's single threshold 0.85: image 0 leaves at exit 1.
    assert result.points[points.fixed(0.85)].point.exit_fractions == (0.25, 0.75)
    assert result.timed_points.keys() == {points.DEFAULT, points.budget(20)}


def test_a_one_exit_model_has_no_operating_points():
    probabilities = np.array([EXIT_2], np.float32)
    images = hand_images()
    cost = costs.ModelCost("vgg16", 1, [costs.ExitCost(1, 5, 1)])
    result = evaluation.evaluate_exits(probabilities, probabilities, cost, images, name="vgg16",
                                       model_dir="", checkpoint="", budgets_mflops=(1,))
    assert result.exit_accuracy == [1.0] and result.default is None
    assert result.timed_points == {} and result.points == {}


def test_the_default_point_exists_when_no_calibrated_point_comes_near_the_last_exit():
    # With q = 1 half the images leave at exit 1 (50% right there): 75%, far from the last
    # exit's 100%. Sending every image to the last exit is then the default point.
    result = _hand_evaluation(qs=(1.0,))
    assert result.default.point.thresholds == (np.inf, -np.inf)
    assert result.default.point.accuracy == 1.0
    assert result.default.point.expected_macs == 30_000_000
    probabilities = np.array([EXIT_1, EXIT_2], np.float32)
    served = exporting.served_thresholds(probabilities, np.array([0, 1, 1, 0]),
                                         [e.macs for e in COST.exits], num_classes=2)
    assert served[points.DEFAULT][-1] == -np.inf


def test_the_representative_images_do_not_depend_on_the_evaluation_seed():
    """The int8 conversion's sample is the export's whatever --seed the eval runs with."""
    splits = data.load_splits(SYNTHETIC)
    first = report_images.evaluation_images(splits, "validation", seed=0).training_pixels
    other = report_images.evaluation_images(splits, "validation", seed=7).training_pixels
    np.testing.assert_array_equal(first, other)
    np.testing.assert_array_equal(first, report_images.representative_pixels(
        splits.train, report_images.REPRESENTATIVE_IMAGES))


def test_a_budget_keeps_its_exact_value():
    """1681.234 M is neither rounded to 1681.23 in its path nor lost from the served set."""
    result = _hand_evaluation(budgets_mflops=(1681.234,))
    assert points.budget(1681.234) in result.timed_points
    assert points.budget(1681.234).path == "budget@1681.234"
    assert result.accuracy_of(points.budget(1681.234)) == 1.0
    probabilities = np.array([EXIT_1, EXIT_2], np.float32)
    served = exporting.served_thresholds(probabilities, np.array([0, 1, 1, 0]),
                                         [e.macs for e in COST.exits], num_classes=2,
                                         budgets_mflops=(1681.234,))
    assert set(served) == {points.DEFAULT, points.budget(1681.234)}

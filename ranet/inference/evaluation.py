"""What adaptive inference buys, per model and runtime: anytime accuracy, the calibrated
operating points reported on other images, exit distributions.

The recipe that chooses thresholds is ``calibration.calibrate_points``; the images come from
``ranet.data.report_images``; latency is measured in ``latency``; rendering is ``report``.
"""

import dataclasses
from typing import Dict, List, Optional, Sequence

import numpy as np

from ranet import jsonio
from ranet.costs import ModelCost
from ranet.data.report_images import EvaluationImages
from ranet.errors import UsageError
from ranet.inference import adaptive, calibration, points
from ranet.inference.points import Kind, PointId
from ranet.models import StagedClassifier
from ranet.training.model_dir import LoadedModel


@dataclasses.dataclass(frozen=True)
class BudgetedResult:
    """An operating point calibrated on one split and reported on another."""
    point_id: PointId
    calibration_accuracy: float
    point: calibration.OperatingPoint    # measured on the report split

    def to_json(self) -> dict:
        return {"point": self.point_id.key, "path": self.point_id.path,
                "thresholds": [jsonio.number(t) for t in self.point.thresholds],
                "expected_macs": float(self.point.expected_macs),
                "accuracy": float(self.point.accuracy),
                "calibration_accuracy": float(self.calibration_accuracy),
                "exit_fractions": [float(f) for f in self.point.exit_fractions]}


@dataclasses.dataclass(frozen=True)
class ModelEvaluation:
    """One model on one runtime's outputs: every exit's accuracy and, for a model with
    several exits, its calibrated operating points (``points``, in the recipe's order)."""
    name: str
    model_dir: str
    checkpoint: str
    cost: ModelCost
    exit_accuracy: List[float]
    points: Dict[PointId, BudgetedResult]
    # [K, N] confidence and predicted class of every exit on the report images: what scores
    # any other set of thresholds there (equal_accuracy).
    report_confidences: np.ndarray
    report_predictions: np.ndarray
    # [K, N] on the calibration images: where any set of thresholds sends those images, what
    # chooses an adaptive path's route (never the report images it is timed on).
    calibration_confidences: Optional[np.ndarray] = None

    def calibration_fractions(self, thresholds: Sequence[float]) -> List[float]:
        """The share of the calibration images leaving at each exit at ``thresholds``."""
        exits = calibration.exit_indices(self.calibration_confidences, thresholds)
        return [float(f) for f in calibration.exit_fractions(exits, len(self.cost.exits))]

    @property
    def is_adaptive(self) -> bool:
        """Whether the model has several exits to choose from."""
        return len(self.cost.exits) > 1

    def of_kind(self, kind: Kind) -> List[BudgetedResult]:
        return [result for point, result in self.points.items() if point.kind == kind]

    @property
    def default(self) -> Optional[BudgetedResult]:
        return self.points.get(points.DEFAULT)

    @property
    def timed_points(self) -> Dict[PointId, List[float]]:
        """The operating points whose latency is measured, with their thresholds: the
        default point and each budget's."""
        return {point: list(result.point.thresholds) for point, result in self.points.items()
                if point.kind in (Kind.DEFAULT, Kind.BUDGET)}

    def accuracy_of(self, point: PointId) -> Optional[float]:
        """The reported accuracy of a path: the last exit's for the full pass, exit k's for the
        network up to exit k, the point's for an operating point it holds; None otherwise."""
        if point == points.FULL:
            return self.exit_accuracy[-1]
        if point.kind == Kind.UP_TO_EXIT:
            return self.exit_accuracy[point.value - 1]
        result = self.points.get(point)
        return None if result is None else result.point.accuracy


def _confidences_and_predictions(probabilities: np.ndarray, kind: str):
    return (np.asarray(adaptive.confidence(probabilities, kind)),
            np.argmax(probabilities, axis=-1).astype(np.int32))


def check_budgets(models: Sequence[LoadedModel], budgets_mflops: Sequence[float]) -> None:
    """Refuses budgets that no operating point of some model can meet."""
    for loaded in models:
        first_exit = loaded.cost.exits[0].macs
        if loaded.model.num_exits > 1 and budgets_mflops and min(budgets_mflops) * 1e6 < first_exit:
            raise UsageError(
                f"--budget_mflops={points.exact(min(budgets_mflops))} is below the cost of "
                f"{loaded.name}'s first exit ({first_exit / 1e6:.2f} M multiply-adds); no "
                "operating point fits. Raise the budget.")


def evaluate_exits(calibration_probabilities: np.ndarray, report_probabilities: np.ndarray,
                   cost: ModelCost, images: EvaluationImages, *, name: str, model_dir: str,
                   checkpoint: str, budgets_mflops: Sequence[float] = (),
                   fixed_threshold: Optional[float] = None,
                   confidence_kind: str = adaptive.MAX_SOFTMAX,
                   qs: Sequence[float] = calibration.reference_sweep()) -> ModelEvaluation:
    """Anytime accuracy and budgeted operating points from every exit's softmax.

    Args:
        calibration_probabilities, report_probabilities: [K, N, C] softmax of every exit on
            the calibration and the report images, from whichever runtime is evaluated;
            thresholds are calibrated on the former and reported on the latter.
    """
    exit_macs = [e.macs for e in cost.exits]
    report_confidences, report_predictions = _confidences_and_predictions(
        report_probabilities, confidence_kind)
    exit_accuracy = [float(np.mean(p == images.report_labels)) for p in report_predictions]
    calibrated = {}
    calibration_confidences, calibration_predictions = _confidences_and_predictions(
        calibration_probabilities, confidence_kind)
    if len(exit_macs) > 1:  # a baseline has no thresholds to choose
        calibrated = calibration.calibrate_points(
            calibration_confidences, calibration_predictions, images.calibration_labels, exit_macs, images.num_classes,
            budgets_mflops=budgets_mflops, fixed=fixed_threshold, qs=qs)
    reported = {point_id: BudgetedResult(point_id, point.accuracy, calibration.evaluate(
        report_confidences, report_predictions, images.report_labels, point.thresholds,
        exit_macs, images.num_classes)) for point_id, point in calibrated.items()}
    return ModelEvaluation(name, model_dir, checkpoint, cost, exit_accuracy, reported,
                           report_confidences, report_predictions, calibration_confidences)


def evaluate_model(model: StagedClassifier, cost: ModelCost, images: EvaluationImages, *,
                   batch_size: int = 256, **options) -> ModelEvaluation:
    """``evaluate_exits`` of a TensorFlow model; ``options`` are its keyword arguments."""
    return evaluate_exits(
        adaptive.all_exit_probabilities(model, images.calibration_images, batch_size),
        adaptive.all_exit_probabilities(model, images.report_images, batch_size), cost, images,
        **options)

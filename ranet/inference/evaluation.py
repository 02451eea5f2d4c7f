"""What adaptive inference buys, per model: anytime accuracy, budgeted operating points,
exit distributions. Latency is measured in ``latency``; rendering is ``report``.

Thresholds are always calibrated on images that are NOT the ones reported: on the
validation split when reporting the test split, and on one class-balanced half of
the validation split when reporting the other half (``--split=validation``).
"""

import dataclasses
import functools
import os
from typing import Dict, List, Optional, Sequence

import numpy as np

from ranet import costs, data, jsonio
from ranet.config import ExperimentConfig
from ranet.costs import ModelCost
from ranet.errors import UsageError
from ranet.inference import adaptive, calibration, latency
from ranet.models import StagedClassifier
from ranet.training import model_dir as model_dir_lib

# The operating point where every image leaves at exit 1: the cheapest one there is,
# so that any budget down to exit 1's cost maps to a point.
_EVERYONE_AT_EXIT_1 = float("-inf")
# The point where every image runs to the last exit: it has the last exit's accuracy, so the
# default point (within one point of it) always exists, however barely trained the model.
_EVERYONE_AT_THE_LAST_EXIT = float("inf")


@dataclasses.dataclass(frozen=True, eq=False)
class LoadedModel:
    """A trained model restored from its directory, with its cost."""
    name: str
    model_dir: str
    config: ExperimentConfig
    model: StagedClassifier
    checkpoint: str
    cost: ModelCost


def load_models(model_dirs: Sequence[str], checkpoint: str = "best",
                precision: str = "fp32") -> List[LoadedModel]:
    """Restores models to compare on the same images: they must share dataset and split.

    Names are the model names, made unique with the directory name where they repeat.
    """
    restored = [model_dir_lib.restore_model(d, checkpoint, precision) for d in model_dirs]
    split_fields = ("dataset", "validation_size", "test_size", "split_seed")
    first = restored[0][0].data
    for model_dir, (config, _, _) in zip(model_dirs[1:], restored[1:]):
        if any(getattr(config.data, f) != getattr(first, f) for f in split_fields):
            raise UsageError(f"{model_dir} was trained on another dataset or split than "
                             f"{model_dirs[0]}; models compared together must share them.")
    names = [config.model.name for config, _, _ in restored]
    return [LoadedModel(
        name=name if names.count(name) == 1 else f"{name} ({os.path.basename(d.rstrip('/'))})",
        model_dir=d, config=config, model=model, checkpoint=path, cost=costs.count(model))
        for name, d, (config, model, path) in zip(names, model_dirs, restored)]


def load_images(models: Sequence[LoadedModel], split: str, seed: int = 0,
                data_dir: Optional[str] = None, max_images: int = 0) -> "EvaluationImages":
    """The shared dataset of ``models`` (optionally from another folder), split for reporting:
    at most ``max_images`` of each split (0: all)."""
    return evaluation_images(data.load_splits_in_memory(
        models[0].config.data.with_data_dir(data_dir), max_images=max_images,
        train_images=REPRESENTATIVE_IMAGES, include_test=split == "test", seed=seed), split, seed)


# Training images kept for the int8 conversion's representative dataset.
REPRESENTATIVE_IMAGES = 256


@dataclasses.dataclass(frozen=True, eq=False)
class EvaluationImages:
    """Images (raw uint8 pixels) and labels to calibrate on and to report on.

    ``calibration_images`` and ``report_images`` are the same pixels normalised as the models
    were trained; ``training_pixels`` is a sample of training images (int8 calibration).
    """
    calibration_name: str
    calibration_pixels: np.ndarray
    calibration_labels: np.ndarray
    report_name: str
    report_pixels: np.ndarray
    report_labels: np.ndarray
    num_classes: int
    mean: np.ndarray
    std: np.ndarray
    training_pixels: np.ndarray

    @functools.cached_property
    def calibration_images(self) -> np.ndarray:
        return data.normalize(self.calibration_pixels, self.mean, self.std)

    @functools.cached_property
    def report_images(self) -> np.ndarray:
        return data.normalize(self.report_pixels, self.mean, self.std)

    @property
    def normalization(self):
        return self.mean, self.std


def evaluation_images(splits: data.DataSplits, split: str, seed: int) -> EvaluationImages:
    """Calibration and report images for ``--split=test|validation``."""
    if len(splits.validation) < 2:
        raise UsageError("Calibrating exit thresholds needs the validation split, but this model "
                         "was trained with --validation_size=0. Retrain with a validation split.")
    if split == "test":
        calibration_split, report_split = splits.validation, data.require_split(splits, "test")
        names = ("validation", "test")
    elif split == "validation":
        calibration_split, report_split = data.split_in_two(splits.validation,
                                                            splits.num_classes, seed)
        names = ("validation (half A)", "validation (half B)")
    else:
        raise ValueError(f"split must be test or validation. Received: split={split!r}")
    sample = np.random.default_rng(seed).choice(
        len(splits.train), min(REPRESENTATIVE_IMAGES, len(splits.train)), replace=False)
    return EvaluationImages(
        calibration_name=names[0], calibration_pixels=calibration_split.images,
        calibration_labels=calibration_split.labels, report_name=names[1],
        report_pixels=report_split.images, report_labels=report_split.labels,
        num_classes=splits.num_classes, mean=splits.mean, std=splits.std,
        training_pixels=splits.train.images[np.sort(sample)])


@dataclasses.dataclass(frozen=True)
class BudgetedResult:
    """An operating point calibrated on one split and reported on another."""
    label: Dict[str, object]   # {"q": q}, {"budget_mflops": b}, {"threshold": t}, {"point": "default"}
    calibration_accuracy: float
    point: calibration.OperatingPoint    # measured on the report split

    def to_json(self) -> dict:
        return {**self.label, "thresholds": [jsonio.number(t) for t in self.point.thresholds],
                "expected_macs": float(self.point.expected_macs),
                "accuracy": float(self.point.accuracy),
                "calibration_accuracy": float(self.calibration_accuracy),
                "exit_fractions": [float(f) for f in self.point.exit_fractions]}


@dataclasses.dataclass(frozen=True)
class ModelEvaluation:
    name: str
    model_dir: str
    checkpoint: str
    cost: ModelCost
    exit_accuracy: List[float]
    sweep: List[BudgetedResult]
    budgets: List[BudgetedResult]
    fixed: Optional[BudgetedResult]
    default: Optional[BudgetedResult]
    # [K, N] confidence and predicted class of every exit on the report images: what scores
    # any other set of thresholds there (equal_accuracy).
    report_confidences: np.ndarray
    report_predictions: np.ndarray

    @property
    def is_adaptive(self) -> bool:
        """Whether the model has several exits to choose from."""
        return len(self.cost.exits) > 1

    @property
    def thresholds_by_path(self) -> Dict[str, List[float]]:
        """Latency paths of the adaptive predictor: the default point and each budget."""
        if self.default is None:
            return {}
        paths = {latency.ADAPTIVE: list(self.default.point.thresholds)}
        for result in self.budgets:
            paths[latency.budget_path(result.label["budget_mflops"])] = list(
                result.point.thresholds)
        return paths


def _confidences_and_predictions(probabilities: np.ndarray, kind: str):
    return (np.asarray(adaptive.confidence(probabilities, kind)),
            np.argmax(probabilities, axis=-1).astype(np.int32))


@dataclasses.dataclass(frozen=True)
class CalibratedPoints:
    """The operating points calibrated on one split: the sweep (one per q), the most accurate
    point within each budget, the default point, and the fixed threshold's point."""
    sweep: List[calibration.OperatingPoint]
    budgets: List[calibration.OperatingPoint]
    default: calibration.OperatingPoint
    fixed: Optional[calibration.OperatingPoint]


def calibrate(confidences: np.ndarray, predictions: np.ndarray, labels: np.ndarray,
              exit_macs: Sequence[int], num_classes: int, *,
              budgets_mflops: Sequence[float] = (), fixed_threshold: Optional[float] = None,
              qs: Sequence[float] = calibration.reference_sweep()) -> CalibratedPoints:
    """The one calibration recipe, for the report and for the served thresholds alike.

    The sweep's points (p_k ~ q^k); for each budget the most accurate of them within it, the
    point that sends every image out at exit 1 included (so any budget down to exit 1's cost
    has one); the default point, the cheapest within one point of the last exit's accuracy,
    the point that sends every image to the last exit included (so it always exists); and the
    seed's single fixed threshold.
    """
    num_exits = len(exit_macs)

    def point(thresholds):
        return calibration.evaluate(confidences, predictions, labels, thresholds, exit_macs,
                                    num_classes)

    sweep = calibration.budgeted_points(confidences, predictions, labels, exit_macs, qs,
                                        num_classes)
    everyone_at_exit_1 = point(calibration.fixed_threshold(_EVERYONE_AT_EXIT_1, num_exits))
    everyone_at_the_last = point(calibration.fixed_threshold(_EVERYONE_AT_THE_LAST_EXIT,
                                                             num_exits))
    last_exit_accuracy = float(np.mean(predictions[-1] == labels))
    return CalibratedPoints(
        sweep=sweep,
        budgets=[calibration.best_within_budget(sweep + [everyone_at_exit_1], b * 1e6)
                 for b in budgets_mflops],
        default=calibration.default_point(sweep + [everyone_at_the_last], last_exit_accuracy),
        fixed=(None if fixed_threshold is None else
               point(calibration.fixed_threshold(fixed_threshold, num_exits))))


def check_budgets(models: Sequence[LoadedModel], budgets_mflops: Sequence[float]) -> None:
    """Refuses budgets that no operating point of some model can meet."""
    for loaded in models:
        first_exit = loaded.cost.exits[0].macs
        if loaded.model.num_exits > 1 and budgets_mflops and min(budgets_mflops) * 1e6 < first_exit:
            raise UsageError(
                f"--budget_mflops={min(budgets_mflops):g} is below the cost of {loaded.name}'s "
                f"first exit ({first_exit / 1e6:.2f} M multiply-adds); no operating point "
                "fits. Raise the budget.")


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
    calibration_confidences, calibration_predictions = _confidences_and_predictions(
        calibration_probabilities, confidence_kind)
    report_confidences, report_predictions = _confidences_and_predictions(
        report_probabilities, confidence_kind)
    exit_accuracy = [float(np.mean(p == images.report_labels)) for p in report_predictions]
    if len(exit_macs) == 1:  # a baseline: no thresholds to choose
        return ModelEvaluation(name, model_dir, checkpoint, cost, exit_accuracy, [], [], None,
                               None, report_confidences, report_predictions)

    def report(label, point):
        measured = calibration.evaluate(report_confidences, report_predictions,
                                        images.report_labels, point.thresholds, exit_macs,
                                        images.num_classes)
        return BudgetedResult(label, point.accuracy, measured)

    calibrated = calibrate(calibration_confidences, calibration_predictions,
                           images.calibration_labels, exit_macs, images.num_classes,
                           budgets_mflops=budgets_mflops, fixed_threshold=fixed_threshold, qs=qs)
    sweep = [report({"q": float(q)}, point) for q, point in zip(qs, calibrated.sweep)]
    budgets = [report({"budget_mflops": float(b)}, point)
               for b, point in zip(budgets_mflops, calibrated.budgets)]
    default = report({"point": "default"}, calibrated.default)
    fixed = (None if calibrated.fixed is None else
             report({"threshold": float(fixed_threshold)}, calibrated.fixed))
    return ModelEvaluation(name, model_dir, checkpoint, cost, exit_accuracy, sweep, budgets,
                           fixed, default, report_confidences, report_predictions)


def evaluate_model(model: StagedClassifier, cost: ModelCost, images: EvaluationImages, *,
                   batch_size: int = 256, **options) -> ModelEvaluation:
    """``evaluate_exits`` of a TensorFlow model; ``options`` are its keyword arguments."""
    return evaluate_exits(
        adaptive.all_exit_probabilities(model, images.calibration_images, batch_size),
        adaptive.all_exit_probabilities(model, images.report_images, batch_size), cost, images,
        **options)


def operating_thresholds(probabilities: np.ndarray, labels: np.ndarray,
                         exit_macs: Sequence[int], num_classes: int, *,
                         confidence_kind: str = adaptive.MAX_SOFTMAX,
                         budgets_mflops: Sequence[float] = (),
                         threshold: Optional[float] = None) -> Dict[str, object]:
    """Thresholds to serve, calibrated on every exit's softmax over a validation split.

    Args:
        probabilities: [K, N, C] softmax of every exit, from the runtime that will serve.
        labels: [N] their true classes.

    Returns:
        ``{"default": [K], "budgets": {"<b>": [K] for each budget}}``, plus ``"fixed": [K]``
        when ``threshold`` is given: the default point (the cheapest within 1 point of the
        last exit's accuracy), the most accurate point within each budget, and the seed's
        single fixed threshold.
    """
    num_exits = len(exit_macs)
    if num_exits == 1:
        single = [float("-inf")]
        return {"default": single, "budgets": {f"{b:g}": single for b in budgets_mflops},
                **({"fixed": single} if threshold is not None else {})}
    if probabilities.shape[1] == 0:
        raise UsageError("Calibrating exit thresholds needs the validation split, but this model "
                         "was trained with --validation_size=0. Pass --threshold instead.")
    confidences, predictions = _confidences_and_predictions(probabilities, confidence_kind)
    calibrated = calibrate(confidences, predictions, labels, exit_macs, num_classes,
                           budgets_mflops=budgets_mflops, fixed_threshold=threshold)
    chosen = {"default": list(calibrated.default.thresholds),
              "budgets": {f"{b:g}": list(point.thresholds)
                          for b, point in zip(budgets_mflops, calibrated.budgets)}}
    if calibrated.fixed is not None:
        chosen["fixed"] = [float(t) for t in calibrated.fixed.thresholds]
    return chosen

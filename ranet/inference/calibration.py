"""Exit thresholds for a compute budget, as the RANet/MSDNet reference calibrates them.

Reference: yangle15/RANet-pytorch, adaptive_inference.py (``dynamic_evaluate``,
``Tester.dynamic_eval_find_threshold``, ``Tester.dynamic_eval_with_threshold``).
Everything here is numpy on per-exit confidences and predictions, which
``ranet.inference.adaptive`` computes from a model.

The protocol: for a target exit distribution p_k proportional to q^k, pick on
the VALIDATION split the thresholds T_k that let floor(n * p_k) of the images
still undecided at exit k leave there (the last exit takes the rest), then
report those same thresholds on the test split. An image leaves at the first
exit k whose confidence is >= T_k. The reference picks thresholds on the test
set unless ``--use-valid`` is given; ``budgeted_points`` takes validation data
so that the caller cannot make that mistake by default.

Departures from the reference: accuracy is a fraction (the reference prints
percent); "nobody leaves" is T_k = +inf (the reference writes 1e8) and the
last exit's threshold is -inf (the reference writes -1e8); p_k and
floor(n * p_k) are computed in float64 (the reference uses float32, which
can round n * p_k differently when it lies within float32 precision of an
integer).
"""

import dataclasses
import math
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from ranet.errors import UsageError
from ranet.inference import points
from ranet.inference.points import PointId

# default_point accepts accuracies within this of the last exit's (one percentage point).
DEFAULT_TOLERANCE = 0.01
# Accuracies are multiples of 1/n; absorbs the rounding of `last - tolerance`.
_ACCURACY_SLACK = 1e-9


@dataclasses.dataclass(frozen=True)
class OperatingPoint:
    """One set of thresholds and what it gives on one split.

    Attributes:
        thresholds: T_k per exit; an image leaves at the first exit with confidence >= T_k.
        accuracy: fraction of images whose prediction at their exit is right.
        expected_macs: mean multiply-adds per image, sum_k exit_fractions[k] * exit_macs[k].
        exit_fractions: fraction of images leaving at each exit.
        exit_fractions_per_class: [num_classes][num_exits], the fraction of each true
            class's images leaving at each exit (zeros for a class with no images).
    """
    thresholds: Tuple[float, ...]
    accuracy: float
    expected_macs: float
    exit_fractions: Tuple[float, ...]
    exit_fractions_per_class: Tuple[Tuple[float, ...], ...]


def exit_distribution(q: float, num_exits: int) -> np.ndarray:
    """The target share of images leaving at each exit: p_k proportional to q^k, k = 1..K."""
    if not q > 0:
        raise ValueError(f"q must be positive (p_k is proportional to q^k). Received: q={q}")
    if num_exits < 1:
        raise ValueError(f"num_exits must be at least 1. Received: num_exits={num_exits}")
    # exp(k log q), as the reference writes it, rather than q ** k: same values, same rounding.
    probabilities = np.exp(np.log(q) * np.arange(1, num_exits + 1, dtype=np.float64))
    return probabilities / probabilities.sum()


def reference_sweep() -> Tuple[float, ...]:
    """The reference's q values: p / 20 for p = 1..39 (q = 1 is a uniform exit distribution)."""
    return tuple(p / 20 for p in range(1, 40))


def _check_table(name: str, table: np.ndarray, shape: Optional[Tuple[int, ...]] = None):
    """Raises unless ``table`` has ``shape`` (or is a non-empty [K, N] table when shape is None)."""
    if shape is None:
        if table.ndim != 2 or table.shape[0] < 1 or table.shape[1] < 1:
            raise ValueError(f"{name} must be a non-empty [num_exits, num_images] table. "
                             f"Received: {name}.shape={table.shape}")
    elif table.shape != shape:
        raise ValueError(f"{name} must have shape {shape} to match the confidences. "
                         f"Received: {name}.shape={table.shape}")


def exit_indices(confidences, thresholds) -> np.ndarray:
    """0-based exit of each image: the first k with confidence >= T_k; the last exit takes all.

    Args:
        confidences: [K, N] confidence of every image at every exit.
        thresholds: [K]; the last is ignored (the last exit accepts everything).
    """
    confidences = np.asarray(confidences)
    _check_table("confidences", confidences)
    thresholds = np.asarray(thresholds, dtype=np.float64)
    _check_table("thresholds", thresholds, (confidences.shape[0],))
    leaves = confidences >= thresholds[:, None]
    leaves[-1] = True
    # argmax finds the first True along the exits.
    return np.argmax(leaves, axis=0)


def exit_fractions(exits, num_exits: int) -> np.ndarray:
    """The share of images leaving at each exit, from ``exit_indices``."""
    return np.bincount(exits, minlength=num_exits) / len(exits)


def expected_macs(exits, exit_macs) -> float:
    """Mean multiply-adds per image of images leaving at ``exits``: sum_k share_k * macs_k,
    the one formula every report and comparison uses, so that one point costs the same to
    the bit wherever it is compared."""
    return float(exit_fractions(exits, len(exit_macs)) @ np.asarray(exit_macs, np.float64))


def thresholds_for_distribution(confidences, distribution) -> np.ndarray:
    """Thresholds that make floor(n * p_k) undecided images leave at each exit k < K.

    The reference's ``dynamic_eval_find_threshold``: at exit k, among the
    images that have not left yet, T_k is the confidence of the
    floor(n * p_k)-th most confident one (+inf if that count is 0 or larger
    than the images left: nobody leaves); then every image with confidence
    >= T_k leaves, ties included. T_K = -inf.

    Args:
        confidences: [K, N] confidences on the calibration (validation) split.
        distribution: [K] target exit shares p_k, e.g. ``exit_distribution(q, K)``.

    Returns:
        float64 [K] thresholds.
    """
    confidences = np.asarray(confidences)
    _check_table("confidences", confidences)
    num_exits, num_images = confidences.shape
    distribution = np.asarray(distribution, dtype=np.float64)
    _check_table("distribution", distribution, (num_exits,))
    thresholds = np.full(num_exits, np.inf)
    exited = np.zeros(num_images, dtype=bool)
    for k in range(num_exits - 1):
        quota = math.floor(num_images * distribution[k])
        remaining = np.sort(confidences[k, ~exited])[::-1]
        if 1 <= quota <= remaining.size:
            thresholds[k] = remaining[quota - 1]
        exited |= confidences[k] >= thresholds[k]
    thresholds[-1] = -np.inf
    return thresholds


def evaluate(confidences, predictions, labels, thresholds, exit_macs,
             num_classes: Optional[int] = None) -> OperatingPoint:
    """Accuracy, expected cost and exit shares of ``thresholds`` on one split.

    The reference's ``dynamic_eval_with_threshold``.

    Args:
        confidences: [K, N] confidence of every image at every exit.
        predictions: [K, N] predicted class of every image at every exit.
        labels: [N] true classes.
        thresholds: [K], e.g. from ``calibrate`` on the validation split.
        exit_macs: [K] cumulative multiply-adds per image up to each exit.
        num_classes: rows of ``exit_fractions_per_class``; default: the largest label + 1.
    """
    confidences = np.asarray(confidences)
    _check_table("confidences", confidences)
    num_exits, num_images = confidences.shape
    predictions = np.asarray(predictions)
    _check_table("predictions", predictions, confidences.shape)
    labels = np.asarray(labels)
    _check_table("labels", labels, (num_images,))
    exit_macs = np.asarray(exit_macs, dtype=np.float64)
    _check_table("exit_macs", exit_macs, (num_exits,))
    if num_classes is None:
        num_classes = int(labels.max()) + 1
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"labels must lie in [0, num_classes={num_classes}). "
                         f"Received: labels from {labels.min()} to {labels.max()}")

    exits = exit_indices(confidences, thresholds)
    correct = predictions[exits, np.arange(num_images)] == labels
    fractions = exit_fractions(exits, num_exits)
    per_class = np.zeros((num_classes, num_exits))
    np.add.at(per_class, (labels, exits), 1.0)
    per_class /= np.maximum(per_class.sum(axis=1, keepdims=True), 1.0)
    return OperatingPoint(
        thresholds=tuple(float(t) for t in np.asarray(thresholds, dtype=np.float64)),
        accuracy=float(correct.mean()),
        expected_macs=expected_macs(exits, exit_macs),
        exit_fractions=tuple(float(f) for f in fractions),
        exit_fractions_per_class=tuple(tuple(float(f) for f in row) for row in per_class))


def budgeted_points(val_confidences, val_predictions, val_labels, exit_macs,
                    qs: Sequence[float] = reference_sweep(),
                    num_classes: Optional[int] = None) -> List[OperatingPoint]:
    """One operating point per q, calibrated AND scored on the validation split.

    Evaluate a chosen point's thresholds on the test split with ``evaluate``;
    its ``expected_macs`` there will differ a little from the validation one.
    """
    val_confidences = np.asarray(val_confidences)
    _check_table("val_confidences", val_confidences)
    num_exits = val_confidences.shape[0]
    return [evaluate(val_confidences, val_predictions, val_labels,
                     thresholds_for_distribution(val_confidences,
                                                 exit_distribution(q, num_exits)), exit_macs,
                     num_classes=num_classes)
            for q in qs]


def best_within_budget(points: Sequence[OperatingPoint], budget_macs: float) -> OperatingPoint:
    """The most accurate point whose expected multiply-adds are <= ``budget_macs``.

    Ties go to the cheaper point. Raises UsageError if no point fits. No
    thresholds cost less than exit 1, which every image runs; the cheapest
    point of the reference sweep (q = 0.05) costs a little more than exit 1,
    so to serve every budget down to exit 1's cost, add the point that sends
    every image out there: ``evaluate(..., first_exit_only(K), ...)``.
    """
    if not points:
        raise ValueError("best_within_budget needs at least one operating point. Received: []")
    affordable = [p for p in points if p.expected_macs <= budget_macs]
    if not affordable:
        cheapest = min(p.expected_macs for p in points)
        raise UsageError(
            f"No operating point fits a budget of {budget_macs:,.1f} multiply-adds per image: "
            f"the cheapest costs {cheapest:,.1f}; no thresholds cost less than the first exit, "
            f"which every image runs. Raise the budget. Received: budget_macs={budget_macs}")
    return max(affordable, key=lambda p: (p.accuracy, -p.expected_macs))


def default_point(points: Sequence[OperatingPoint], last_exit_accuracy: float,
                  tolerance: float = DEFAULT_TOLERANCE) -> OperatingPoint:
    """The cheapest point within ``tolerance`` (one point) of the last exit's accuracy."""
    good = [p for p in points if p.accuracy >= last_exit_accuracy - tolerance - _ACCURACY_SLACK]
    if not good:
        best = max((p.accuracy for p in points), default=float("nan"))
        raise ValueError(
            f"No operating point is within {tolerance} of the last exit's accuracy "
            f"({last_exit_accuracy:.4f}); the best reaches {best:.4f}. Calibrate with larger q "
            "values (more images at the last exit) or pass a larger tolerance. Received: "
            f"last_exit_accuracy={last_exit_accuracy}, tolerance={tolerance}")
    return min(good, key=lambda p: (p.expected_macs, -p.accuracy))


def fixed_threshold(value: float, num_exits: int) -> np.ndarray:
    """One threshold at every exit but the last, which takes everything (the seed's 0.85)."""
    if num_exits < 1:
        raise ValueError(f"num_exits must be at least 1. Received: num_exits={num_exits}")
    return np.array([value] * (num_exits - 1) + [-np.inf], dtype=np.float64)


def first_exit_only(num_exits: int) -> np.ndarray:
    """Thresholds that send every image out at exit 1: the cheapest point there is."""
    return fixed_threshold(-np.inf, num_exits)


def last_exit_only(num_exits: int) -> np.ndarray:
    """Thresholds that send every image to the last exit: the last exit's accuracy."""
    return fixed_threshold(np.inf, num_exits)


def calibrate_points(confidences, predictions, labels, exit_macs, num_classes: int, *,
                     budgets_mflops: Sequence[float] = (),
                     fixed: Optional[float] = None,
                     qs: Sequence[float] = reference_sweep()) -> Dict[PointId, OperatingPoint]:
    """The one calibration recipe, for the report and for the served thresholds alike.

    On one split ([K, N] confidences and predictions, [N] labels): the sweep's points
    (p_k ~ q^k, ``points.sweep(q)``); for each budget (``points.budget(b)``) the most accurate
    of them within it, the point that sends every image out at exit 1 included (so any budget
    down to exit 1's cost has one); the default point (``points.DEFAULT``), the cheapest within
    one point of the last exit's accuracy, the point that sends every image to the last exit
    included (so it always exists, however barely trained the model); and, with ``fixed``,
    the seed's single fixed threshold (``points.fixed(t)``). In that order.
    """
    confidences, predictions = np.asarray(confidences), np.asarray(predictions)
    num_exits = len(exit_macs)

    def point(thresholds):
        return evaluate(confidences, predictions, labels, thresholds, exit_macs, num_classes)

    sweep = budgeted_points(confidences, predictions, labels, exit_macs, qs, num_classes)
    calibrated = {points.sweep(q): p for q, p in zip(qs, sweep)}
    everyone_at_exit_1 = point(first_exit_only(num_exits))
    for b in budgets_mflops:
        calibrated[points.budget(b)] = best_within_budget(sweep + [everyone_at_exit_1], b * 1e6)
    last_exit_accuracy = float(np.mean(predictions[-1] == np.asarray(labels)))
    calibrated[points.DEFAULT] = default_point(sweep + [point(last_exit_only(num_exits))],
                                               last_exit_accuracy)
    if fixed is not None:
        calibrated[points.fixed(fixed)] = point(fixed_threshold(fixed, num_exits))
    return calibrated

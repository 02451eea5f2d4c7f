"""RANet against each baseline at equal accuracy: the cheapest RANet operating point that
scores at least the baseline's accuracy on the reported images, and how sure that is.

Every candidate point's thresholds were calibrated on the calibration split, as all of
RANet's points are; only the choice among them reads the reported split, because the
question is "as accurate as B there". Both models answer the same images, so the accuracy
difference gets a paired interval: only the images one gets right and the other wrong move
it. Pure numpy; ``comparison`` times the chosen points and ``report`` renders them.
"""

import dataclasses
import math
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from ranet import jsonio
from ranet.inference import calibration, points
from ranet.inference.points import PointId

# Two-sided 95% quantile of the standard normal.
Z_95 = 1.959963984540054


def paired_difference_interval(correct_a, correct_b, z: float = Z_95) -> Tuple[float, float]:
    """Interval of accuracy(a) - accuracy(b) when a and b answered the same images.

    The Wald interval of a difference of paired proportions, the one that goes with
    McNemar's test (Agresti, Categorical Data Analysis, 10.1): with n10 images only a gets
    right and n01 only b, d = (n10 - n01) / n and var(d) = (n10 + n01 - n d^2) / n^2.
    Images both get right or both get wrong do not move it, which makes it far narrower than
    an interval that treats the two accuracies as independent samples.
    """
    correct_a, correct_b = np.asarray(correct_a, bool), np.asarray(correct_b, bool)
    if correct_a.shape != correct_b.shape or correct_a.ndim != 1 or not len(correct_a):
        raise ValueError("correct_a and correct_b must be non-empty [num_images] vectors over "
                         f"the same images. Received: shapes {correct_a.shape} and "
                         f"{correct_b.shape}")
    n = len(correct_a)
    only_a = int(np.sum(correct_a & ~correct_b))
    only_b = int(np.sum(~correct_a & correct_b))
    difference = (only_a - only_b) / n
    half_width = z * math.sqrt(max(only_a + only_b - n * difference ** 2, 0.0)) / n
    return difference - half_width, difference + half_width


@dataclasses.dataclass(frozen=True, eq=False)
class Candidate:
    """One calibrated operating point of an early-exit model, scored image by image."""
    point_id: PointId                 # a calibrated point's, or points.LAST_EXIT
    thresholds: Tuple[float, ...]
    expected_macs: float
    correct: np.ndarray               # [num_images] bool: right at the exit the image took

    @property
    def accuracy(self) -> float:
        return float(np.mean(self.correct))


def candidate(point_id: PointId, thresholds: Sequence[float], confidences: np.ndarray,
              predictions: np.ndarray, labels: np.ndarray,
              exit_macs: Sequence[int]) -> Candidate:
    """Scores ``thresholds`` on every image: which exit each takes, what it costs, whether
    the answer there is right."""
    exits = calibration.exit_indices(confidences, thresholds)
    correct = predictions[exits, np.arange(len(labels))] == labels
    macs = float(np.mean(np.asarray(exit_macs, np.float64)[exits]))
    return Candidate(point_id, tuple(float(t) for t in thresholds), macs, correct)


@dataclasses.dataclass(frozen=True, eq=False)
class Choice:
    """The RANet point chosen against one baseline, on one runtime."""
    baseline: str
    baseline_accuracy: float
    baseline_macs: int
    point: Candidate
    reaches: bool                          # point.accuracy >= baseline_accuracy
    difference_ci95: Tuple[float, float]   # RANet - baseline, paired
    path: Optional[PointId] = None         # the latency path that times the point

    @property
    def macs_ratio(self) -> float:
        """Baseline multiply-adds over RANet's expected ones: > 1 when RANet computes less."""
        return self.baseline_macs / self.point.expected_macs


def choose(candidates: Sequence[Candidate], baseline: str, baseline_correct,
           baseline_macs: int) -> Choice:
    """The cheapest candidate at least as accurate as the baseline on these images (ties in
    cost: the more accurate); when none is, the most accurate (ties: the cheaper).

    Accuracies are compared as counts of right answers over the same images, exactly.
    """
    if not candidates:
        raise ValueError("choose needs at least one operating point (the last exit alone is "
                         "always one).")
    baseline_correct = np.asarray(baseline_correct, bool)
    needed = int(baseline_correct.sum())
    reaching = [c for c in candidates if int(c.correct.sum()) >= needed]
    if reaching:
        point = min(reaching, key=lambda c: (c.expected_macs, -int(c.correct.sum())))
    else:
        point = max(candidates, key=lambda c: (int(c.correct.sum()), -c.expected_macs))
    return Choice(baseline, float(np.mean(baseline_correct)), int(baseline_macs), point,
                  bool(reaching), paired_difference_interval(point.correct, baseline_correct))


def latency_ratios(choice_p50_p90: Dict[str, float],
                   baseline_p50_p90: Dict[str, float]) -> Dict[str, Optional[float]]:
    """Baseline latency over RANet's, at p50 and p90: > 1 when RANet answers faster."""
    return {f"latency_ratio_{q}": (baseline_p50_p90[q] / choice_p50_p90[q]
                                   if choice_p50_p90.get(q) else None) for q in ("p50", "p90")}


def to_json(choice: Choice, ranet_latency: Optional[Dict[str, float]],
            baseline_latency: Optional[Dict[str, float]]) -> dict:
    """The report.json entry of ``choice``; ``*_latency``: the timed paths' statistics (ms)."""
    entry = {
        "ranet_point": {"point": choice.point.point_id.key,
                        "path": None if choice.path is None else choice.path.path,
                        "thresholds": [jsonio.number(t) for t in choice.point.thresholds],
                        "expected_macs": choice.point.expected_macs},
        "reaches": choice.reaches,
        "ranet_accuracy": choice.point.accuracy,
        "baseline_accuracy": choice.baseline_accuracy,
        "difference_ci95": list(choice.difference_ci95),
        "gap_points": 100 * (choice.point.accuracy - choice.baseline_accuracy),
        "macs_ratio": choice.macs_ratio,
        "ranet_latency_ms": _p50_p90(ranet_latency),
        "baseline_latency_ms": _p50_p90(baseline_latency),
    }
    if ranet_latency and baseline_latency:
        entry.update(latency_ratios(ranet_latency, baseline_latency))
    else:
        entry.update({"latency_ratio_p50": None, "latency_ratio_p90": None})
    return entry


def _p50_p90(stats: Optional[Dict[str, float]]) -> Optional[Dict[str, float]]:
    return None if stats is None else {"p50": stats["p50"], "p90": stats["p90"]}


def candidates_of(evaluation, labels: np.ndarray) -> List[Candidate]:
    """Every calibrated point of an early-exit ``ModelEvaluation`` (the sweep, the budgets,
    the default and fixed points) and the last exit alone, scored on the reported images.

    The last exit alone is always a candidate, so that a model whose last exit beats the
    baseline always has a point that reaches it."""
    exit_macs = [e.macs for e in evaluation.cost.exits]
    pool = [(point_id, result.point.thresholds)
            for point_id, result in evaluation.points.items()]
    pool.append((points.LAST_EXIT, calibration.last_exit_only(len(exit_macs))))
    return [candidate(point_id, thresholds, evaluation.report_confidences,
                      evaluation.report_predictions, labels, exit_macs)
            for point_id, thresholds in pool]


def choices(ranet, baselines: Sequence, labels: np.ndarray,
            timed_points: Dict[PointId, Sequence[float]]) -> Dict[str, Choice]:
    """RANet's point against each baseline (``ModelEvaluation``s of one runtime).

    ``timed_points``: RANet's operating points already timed, with their thresholds; a chosen
    point with the same thresholds is timed through that path (or through the path of the
    baseline that chose it first), any other through ``points.equal(B)``.
    """
    pool = candidates_of(ranet, labels)
    by_thresholds = {tuple(float(t) for t in values): point
                     for point, values in timed_points.items()}
    chosen = {}
    for baseline in baselines:
        choice = choose(pool, baseline.name, baseline.report_predictions[0] == labels,
                        baseline.cost.exits[-1].macs)
        path = by_thresholds.setdefault(choice.point.thresholds, points.equal(baseline.name))
        chosen[baseline.name] = dataclasses.replace(choice, path=path)
    return chosen

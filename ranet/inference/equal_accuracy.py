"""One model's operating points against another's on the same images, and the first question
asked of them: at equal accuracy, the cheapest point of the model that scores at least the
other's accuracy on the reported images, and how sure that is.

The other model is a baseline (one point: its one pass) or a model with exits of its own
(each of its calibrated points in turn); ``equal_budget`` asks the paper's second question of
the same pairs. Every candidate point's thresholds were calibrated on the calibration split,
as all operating points are; only the choice among them reads the reported split, because
the question is "as accurate as B there". Both models answer the same images, so the
accuracy difference gets a paired interval: only the images one gets right and the other
wrong move it. Pure numpy; ``comparison`` pairs the models and times the chosen points,
``report`` renders them.
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

Thresholds = Tuple[float, ...]


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
    """One operating point of a model, scored image by image on the reported images."""
    point_id: PointId                 # a calibrated point's, points.LAST_EXIT or points.FULL
    thresholds: Thresholds            # () for a one-exit model's pass
    expected_macs: float
    correct: np.ndarray               # [num_images] bool: right at the exit the image took

    @property
    def num_correct(self) -> int:
        """Right answers: accuracies over the same images compare exactly as counts."""
        return int(self.correct.sum())

    @property
    def accuracy(self) -> float:
        return float(np.mean(self.correct))


def candidate(point_id: PointId, thresholds: Sequence[float], confidences: np.ndarray,
              predictions: np.ndarray, labels: np.ndarray,
              exit_macs: Sequence[int]) -> Candidate:
    """Scores ``thresholds`` on every image: which exit each takes, what it costs (as the
    report costs its points), whether the answer there is right."""
    exits = calibration.exit_indices(confidences, thresholds)
    correct = predictions[exits, np.arange(len(labels))] == labels
    return Candidate(point_id, tuple(float(t) for t in thresholds),
                     calibration.expected_macs(exits, exit_macs), correct)


def one_pass(evaluation, labels: np.ndarray) -> Candidate:
    """A one-exit model (a ``ModelEvaluation``) as the one point it has: its full pass."""
    return Candidate(points.FULL, (), float(evaluation.cost.exits[-1].macs),
                     evaluation.report_predictions[-1] == labels)


def calibrated_candidates(evaluation, labels: np.ndarray) -> List[Candidate]:
    """Every calibrated point of an early-exit ``ModelEvaluation`` (the sweep, the budgets,
    the default and fixed points, in the recipe's order), scored on the reported images."""
    exit_macs = [e.macs for e in evaluation.cost.exits]
    return [candidate(point_id, result.point.thresholds, evaluation.report_confidences,
                      evaluation.report_predictions, labels, exit_macs)
            for point_id, result in evaluation.points.items()]


def candidates_of(evaluation, labels: np.ndarray) -> List[Candidate]:
    """The points a model may answer with when matched against another: every calibrated
    point and the last exit alone.

    The last exit alone is always a candidate, so that a model whose last exit beats the
    other model always has a point that reaches it."""
    last_exit = candidate(points.LAST_EXIT,
                          calibration.last_exit_only(len(evaluation.cost.exits)),
                          evaluation.report_confidences, evaluation.report_predictions, labels,
                          [e.macs for e in evaluation.cost.exits])
    return calibrated_candidates(evaluation, labels) + [last_exit]


def distinct(candidates: Sequence[Candidate]) -> List[Candidate]:
    """One candidate per set of thresholds, cheapest first (ties: in the order given).

    Identical thresholds answer every image alike: listed twice, one operating point would
    count as two budgets in a verdict. The first of the recipe's order keeps its name."""
    unique = {}
    for point in candidates:
        unique.setdefault(point.thresholds, point)
    return sorted(unique.values(), key=lambda point: point.expected_macs)


@dataclasses.dataclass(frozen=True)
class Pair:
    """Two models compared: the points of ``model`` chosen against those of ``other``."""
    model: str
    other: str

    @property
    def key(self) -> str:
        """Its name in report.json and report.md."""
        return f"{self.model} vs {self.other}"


@dataclasses.dataclass(frozen=True, eq=False)
class Match:
    """The point of ``pair.model`` chosen against one point of ``pair.other`` (``target``),
    on one runtime's outputs."""
    pair: Pair
    target: Candidate
    point: Optional[Candidate]            # None: the model has no point the question admits
    path: Optional[PointId] = None        # the model's latency path that timed ``point``
    target_path: Optional[PointId] = None
    reason: Optional[str] = None          # why ``point`` is None

    @property
    def reaches(self) -> bool:
        """Whether the model's point is at least as accurate as the other's."""
        return self.point is not None and self.point.num_correct >= self.target.num_correct

    @property
    def difference(self) -> Optional[float]:
        """accuracy(model) - accuracy(other)."""
        return None if self.point is None else self.point.accuracy - self.target.accuracy

    @property
    def difference_ci95(self) -> Optional[Tuple[float, float]]:
        """The paired 95% interval of ``difference``."""
        if self.point is None:
            return None
        return paired_difference_interval(self.point.correct, self.target.correct)

    @property
    def macs_ratio(self) -> Optional[float]:
        """The other's multiply-adds over the model's: > 1 when the model computes less."""
        return None if self.point is None else (self.target.expected_macs
                                                / self.point.expected_macs)


def timed_by_thresholds(timed_points: Dict[PointId, Sequence[float]]
                        ) -> Dict[Thresholds, PointId]:
    """The latency path that times each set of thresholds (``ModelEvaluation.timed_points``
    or a comparison's timed thresholds of one model)."""
    return {tuple(float(t) for t in values): point for point, values in timed_points.items()}


def cheapest_as_accurate(pool: Sequence[Candidate], target: Candidate) -> Candidate:
    """The cheapest candidate at least as accurate as ``target`` on the same images (ties in
    cost: the more accurate); when none is, the most accurate (ties: the cheaper)."""
    if not pool:
        raise ValueError("cheapest_as_accurate needs at least one operating point (the last "
                         "exit alone is always one).")
    reaching = [c for c in pool if c.num_correct >= target.num_correct]
    if reaching:
        return min(reaching, key=lambda c: (c.expected_macs, -c.num_correct))
    return max(pool, key=lambda c: (c.num_correct, -c.expected_macs))


def match(pair: Pair, target: Candidate, point: Optional[Candidate],
          paths: Dict[Thresholds, PointId], target_paths: Dict[Thresholds, PointId],
          reason: Optional[str] = None) -> Match:
    """A ``Match`` whose points carry the latency paths that timed them, where they were
    timed; ``paths``, ``target_paths``: each model's ``timed_by_thresholds``."""
    return Match(pair, target, point, None if point is None else paths.get(point.thresholds),
                 target_paths.get(target.thresholds), reason)


def at_equal_accuracy(pair: Pair, pool: Sequence[Candidate], targets: Sequence[Candidate],
                      paths: Dict[Thresholds, PointId],
                      target_paths: Dict[Thresholds, PointId]) -> List[Match]:
    """For each of the other model's points (``targets``), the model's cheapest point in
    ``pool`` as accurate; no point is timed for it, so only points already timed on both
    sides have latencies."""
    return [match(pair, target, cheapest_as_accurate(pool, target), paths, target_paths)
            for target in targets]


def against_baselines(evaluation, baselines: Sequence, labels: np.ndarray,
                      timed_points: Dict[PointId, Sequence[float]]) -> Dict[Pair, List[Match]]:
    """An early-exit model's point against each one-exit model (``ModelEvaluation``s of one
    runtime), one match per baseline.

    ``timed_points``: the model's operating points already timed, with their thresholds; a
    chosen point with the same thresholds is timed through that path (or through the path
    of the baseline that chose it first), any other through ``points.equal(B)``, which the
    caller times.
    """
    pool = candidates_of(evaluation, labels)
    paths = timed_by_thresholds(timed_points)
    matched = {}
    for baseline in baselines:
        pair = Pair(evaluation.name, baseline.name)
        target = one_pass(baseline, labels)
        point = cheapest_as_accurate(pool, target)
        path = paths.setdefault(point.thresholds, points.equal(baseline.name))
        matched[pair] = [Match(pair, target, point, path, points.FULL)]
    return matched


def latency_ratios(model_stats: Optional[Dict[str, float]],
                   other_stats: Optional[Dict[str, float]]) -> Dict[str, Optional[float]]:
    """The other's latency over the model's, at p50 and p90: > 1 when the model answers
    faster; None where either point was not timed."""
    return {f"latency_ratio_{q}": (other_stats[q] / model_stats[q]
                                   if model_stats and other_stats and model_stats[q] else None)
            for q in ("p50", "p90")}


def to_json(match: Match, model_latency: Optional[Dict[str, float]],
            other_latency: Optional[Dict[str, float]]) -> dict:
    """The report.json entry of ``match``, keyed by model name where it has a value per
    model; ``*_latency``: the timed paths' statistics (ms), None where a point was not
    timed. Every entry has the same keys, whichever question chose the point."""
    model, other = match.pair.model, match.pair.other
    interval = match.difference_ci95
    return {
        "macs": match.target.expected_macs,
        "points": {model: _point_json(match.point, match.path),
                   other: _point_json(match.target, match.target_path)},
        "accuracy": {model: None if match.point is None else match.point.accuracy,
                     other: match.target.accuracy},
        "reaches": match.reaches,
        "difference": match.difference,
        "difference_ci95": None if interval is None else list(interval),
        "macs_ratio": match.macs_ratio,
        "latency_ms": {model: _p50_p90(model_latency), other: _p50_p90(other_latency)},
        **latency_ratios(model_latency, other_latency),
        "reason": match.reason,
    }


def _point_json(point: Optional[Candidate], path: Optional[PointId]) -> Optional[dict]:
    if point is None:
        return None
    return {"point": point.point_id.key, "label": point.point_id.label,
            "path": None if path is None else path.path,
            "thresholds": [jsonio.number(t) for t in point.thresholds],
            "expected_macs": point.expected_macs}


def _p50_p90(stats: Optional[Dict[str, float]]) -> Optional[Dict[str, float]]:
    return None if stats is None else {"p50": stats["p50"], "p90": stats["p90"]}

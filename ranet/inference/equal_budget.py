"""The RANet paper's budgeted contest between two models with exits: at each calibrated point
of the other model (its expected multiply-adds on the reported images, the budget), the
model's most accurate point that costs no more, and a verdict over every budget.

The answer is always a point the model has, never a curve interpolated between two: an
interpolated accuracy is one no thresholds give. Where even the model's cheapest point costs
more than the budget, there is no answer, and the match says why. The accuracy difference
gets the paired interval of ``equal_accuracy`` (both models answer the same images), and the
verdict counts the budgets where it lies above zero, below zero, or spans it. Pure numpy on
``equal_accuracy.Candidate``s; ``comparison`` pairs the models, ``report`` renders them.
"""

import dataclasses
import enum
import itertools
from typing import Dict, List, Optional, Sequence, Tuple

from ranet.inference import calibration
from ranet.inference.equal_accuracy import Candidate, Match, Pair, Thresholds, match
from ranet.inference.points import PointId


def best_within(pool: Sequence[Candidate], target: Candidate) -> Optional[Candidate]:
    """The most accurate candidate whose expected multiply-adds are at most ``target``'s
    (ties: the cheaper), by the rule that picks a point within a user's budget; None when
    every candidate costs more."""
    affordable = [c for c in pool if c.expected_macs <= target.expected_macs]
    # The calibration's rule refuses an empty choice as a user's error; here it is an answer.
    return (calibration.best_within_budget(affordable, target.expected_macs) if affordable
            else None)


def at_equal_budget(pair: Pair, pool: Sequence[Candidate], targets: Sequence[Candidate],
                    paths: Dict[Thresholds, PointId],
                    target_paths: Dict[Thresholds, PointId]) -> List[Match]:
    """For each of the other model's points (``targets``), the model's most accurate point in
    ``pool`` at no more multiply-adds; ``paths``, ``target_paths``: each model's timed
    thresholds (``equal_accuracy.timed_by_thresholds``)."""
    matches = []
    for target in targets:
        point = best_within(pool, target)
        reason = None if point is not None else (
            f"no {pair.model} point costs at most {target.expected_macs / 1e6:.2f} M "
            f"multiply-adds; its cheapest costs "
            f"{min(c.expected_macs for c in pool) / 1e6:.2f} M")
        matches.append(match(pair, target, point, paths, target_paths, reason))
    return matches


class Outcome(enum.Enum):
    """What the paired interval says at one budget; the value is its name in report.json."""
    LEADS = "leads"           # above zero: the model is more accurate
    TRAILS = "trails"         # below zero: the other model is
    WITHIN = "within"         # it spans zero
    UNMATCHED = "unmatched"   # the model has no point that cheap


def outcome(matched: Match) -> Outcome:
    interval = matched.difference_ci95
    if interval is None:
        return Outcome.UNMATCHED
    low, high = interval
    if low > 0:
        return Outcome.LEADS
    if high < 0:
        return Outcome.TRAILS
    return Outcome.WITHIN


@dataclasses.dataclass(frozen=True)
class Verdict:
    """One pair on one runtime: the outcome at each budget (the other model's expected
    multiply-adds), cheapest first."""
    runtime: str
    pair: Pair
    outcomes: Tuple[Tuple[float, Outcome], ...]

    def budgets(self, kind: Outcome) -> List[float]:
        return [macs for macs, found in self.outcomes if found == kind]

    @property
    def text(self) -> str:
        """One line: "ranet vs msdnet (tf): ranet leads at 3 of 7 budgets (15.0-40.0 MMACs),
        msdnet at 1 (120.0 MMACs), 3 within the interval"."""
        model, other = self.pair.model, self.pair.other
        leads, trails = self.budgets(Outcome.LEADS), self.budgets(Outcome.TRAILS)
        unmatched = self.budgets(Outcome.UNMATCHED)
        parts = [f"{model} leads at {len(leads)} of {len(self.outcomes)} budgets"
                 f"{self._where(Outcome.LEADS)}",
                 f"{other} at {len(trails)}{self._where(Outcome.TRAILS)}",
                 f"{len(self.budgets(Outcome.WITHIN))} within the interval"]
        if unmatched:
            parts.append(f"{len(unmatched)} cheaper than any {model} point"
                         f"{self._where(Outcome.UNMATCHED)}")
        return f"{self.pair.key} ({self.runtime}): " + ", ".join(parts)

    def _where(self, kind: Outcome) -> str:
        """The budgets of ``kind``, e.g. ' (15.0-40.0, 120.0 MMACs)': runs of neighbours
        among all budgets, so that a range never spans a budget with another outcome."""
        runs = [[macs for macs, _ in run]
                for found, run in itertools.groupby(self.outcomes, key=lambda entry: entry[1])
                if found == kind]
        if not runs:
            return ""
        return " (" + ", ".join(_mmacs(run[0]) if len(run) == 1 else
                                f"{_mmacs(run[0])}-{_mmacs(run[-1])}" for run in runs) + " MMACs)"

    def to_json(self) -> dict:
        """The line, and the budgets (multiply-adds) of each outcome by who leads there."""
        return {"text": self.text, "budgets": len(self.outcomes),
                "leads": {self.pair.model: self.budgets(Outcome.LEADS),
                          self.pair.other: self.budgets(Outcome.TRAILS)},
                "within": self.budgets(Outcome.WITHIN),
                "unmatched": self.budgets(Outcome.UNMATCHED)}


def _mmacs(macs: float) -> str:
    return f"{macs / 1e6:.1f}"


def verdict(runtime: str, pair: Pair, matches: Sequence[Match]) -> Verdict:
    """The verdict of ``pair``'s matches at equal budget on ``runtime``."""
    ordered = sorted(matches, key=lambda matched: matched.target.expected_macs)
    return Verdict(runtime, pair, tuple((m.target.expected_macs, outcome(m)) for m in ordered))

"""Time-budgeted training: how many steps fit in the time a run was given.

A run with ``--time_budget`` trains for a while first (the probe), measuring how long its steps
take as the loop runs them, and how long an evaluation and a checkpoint take; then it plans
the total number of steps so that training, every evaluation and checkpoint to come, and the
final ones end inside the budget (minus a small reserve). The schedule is then fitted to that
total (``Training.set_total_steps``), and the plan is written into the model directory: a
resumed run follows it rather than measuring again, so that the schedule stays one schedule.
At each log line the run refits its plan to the pace since planning: shorter if the machine
has slowed down, so that it still ends in time; longer if it has sped up, so that the budget
is not left unused.

``TimeBudget`` makes those decisions and reads no clock: the loop passes it the time, so a
test drives it with a fake one. The functions below it are its arithmetic.
"""

import dataclasses
import math
import os
import statistics
import sys
from typing import Callable, Optional

from ranet import jsonio
from ranet.config import OptimConfig, RuntimeConfig, StepPlan
from ranet.errors import UsageError

PLAN_FILENAME = "budget_plan.json"
# Kept back from the budget for what a plan cannot foresee: logging and summaries, the
# machine slowing down.
RESERVE_SHARE = 0.03
# Steps after the plan before the pace since then is trusted to refit it.
MIN_STEPS_TO_PACE = 20
# How much longer (share of the plan) the steps that fit must be before a plan is lengthened:
# the schedule changes with it, so not for every small speed-up.
LENGTHEN_SHARE = 0.02
# How long (share of the budget, within these bounds) the probe lasts.
PROBE_SHARE, MIN_PROBE_SECONDS, MAX_PROBE_SECONDS = 0.02, 2.0, 60.0


@dataclasses.dataclass(frozen=True)
class BudgetPlan:
    """What was measured, and the steps planned from it."""
    budget_seconds: float
    planned_at_step: int
    planned_after_seconds: float     # of the budget, spent before planning
    seconds_per_step: float          # as the loop runs them: compiled calls, logging and all
    eval_seconds: float
    save_seconds: float
    total_steps: int
    steps_per_epoch: int

    @property
    def epochs(self) -> float:
        return self.total_steps / self.steps_per_epoch

    def describe(self) -> str:
        return (f"~{self.total_steps} steps, ~{self.epochs:.1f} epochs in the budget of "
                f"{self.budget_seconds:g} s (measured: {1 / self.seconds_per_step:.1f} steps/s, "
                f"{self.eval_seconds:.1f} s per evaluation, {self.save_seconds:.2f} s per "
                "checkpoint)")


@dataclasses.dataclass(frozen=True)
class Timings:
    """What the loop measured since it last consulted its budget, in seconds."""
    steps: int
    train_seconds: float                       # the compiled call and its log line
    evaluation_seconds: Optional[float] = None
    save_seconds: Optional[float] = None


class TimeBudget:
    """Decides where a run with ``--time_budget`` ends; the loop asks, after each compiled call.

    The loop runs a call of at most ``longest_call()`` steps to its next boundary, then its
    actions (an evaluation also when ``wants_evaluation()``, a checkpoint also when
    ``wants_save()``), then ``after(step, now, timings)``: a new last step when the budget
    plans or refits, otherwise None. ``now`` is the loop's clock, the one ``started_at`` was
    read from; nothing here reads a clock.

    Probe: the first call traces the step and is not timed; the calls after it, the same
    log-interval calls as the rest of the run, are, for ``probe_seconds``. Two evaluations
    (the first traces it) and a checkpoint are timed at the probe's first boundaries. Then
    ``plan`` fits the steps into the budget. After that, each log line refits the plan to the
    pace since planning (``refit``).

    ``agree``: in a multi-worker run, the chief's value on every worker
    (``distribute.broadcast_from_chief``). Each worker times its own steps; every decision
    that depends on time passes through it, so that all workers run the same calls and stop
    at the same step. Nothing returns early before it on one worker but not another.
    """

    def __init__(self, optim: OptimConfig, runtime: RuntimeConfig, step_plan: StepPlan, *,
                 started_at: float, evaluates: bool,
                 agree: Optional[Callable[[int], int]] = None):
        self.budget_seconds = optim.time_budget_seconds
        self.schedule, self.decay_fractions = optim.schedule, tuple(optim.decay_fractions)
        self.steps_per_epoch = step_plan.steps_per_epoch
        self.eval_every_steps = step_plan.eval_every_steps
        self.save_every_steps = runtime.checkpoint_every_steps
        self.log_every_steps = runtime.log_every_steps
        self.started_at, self.evaluates = started_at, evaluates
        self.agree = agree or (lambda value: value)
        self.probe_seconds = probe_seconds(self.budget_seconds)
        self.plan: Optional[BudgetPlan] = None
        self.steps_per_second: Optional[float] = None  # since planning, at the last refit
        self._planned_at: Optional[float] = None
        self._probe_started: Optional[float] = None
        self._tracing_seconds = 0.0
        self._probe_steps, self._probe_seconds_spent = 0, 0.0
        self._evaluations: list = []
        self._saves: list = []

    @property
    def planned(self) -> bool:
        return self.plan is not None

    def longest_call(self) -> Optional[int]:
        """The most steps the next call may run; None once planned.

        While probing, about the probe's length at the pace so far (the traced call's, before
        any other is timed): a call ends at the next boundary when one is that close, so the
        probe times the run's calls, and otherwise ends soon enough for the probe to end near
        its time. One step before anything is timed.
        """
        if self.plan is not None:
            return None
        if self._probe_started is None:
            return 1
        seconds_per_step = (self._probe_seconds_spent / self._probe_steps if self._probe_steps
                            else self._tracing_seconds)
        return self.agree(max(1, int(self.probe_seconds / max(seconds_per_step, 1e-9))))

    def wants_evaluation(self) -> bool:
        """Whether the probe still needs an evaluation timed (two: the first one traces)."""
        return self.plan is None and self.evaluates and len(self._evaluations) < 2

    def wants_save(self) -> bool:
        """Whether the probe still needs a checkpoint timed."""
        return self.plan is None and not self._saves

    def after(self, step: int, now: float, timings: Timings) -> Optional[int]:
        """The run's new last step once ``timings`` brought it to ``step`` at ``now``, or None
        when it stays (still probing, or the plan holds)."""
        if self.plan is None:
            if timings.evaluation_seconds is not None:
                self._evaluations.append(timings.evaluation_seconds)
            if timings.save_seconds is not None:
                self._saves.append(timings.save_seconds)
            return self._probe(step, now, timings)
        return self._refit(step, now)

    def _probe(self, step: int, now: float, timings: Timings) -> Optional[int]:
        if self._probe_started is None:
            self._probe_started, self._tracing_seconds = now, timings.train_seconds
            return None
        self._probe_steps += timings.steps
        self._probe_seconds_spent += timings.train_seconds
        done = (now - self._probe_started >= self.probe_seconds and not self.wants_evaluation()
                and not self.wants_save())
        if not self.agree(int(done)):
            return None
        budget_plan = plan(
            self.budget_seconds, now - self.started_at, step,
            self._probe_seconds_spent / self._probe_steps,
            # The first evaluation traces it: the later ones say what the others will cost.
            statistics.median(self._evaluations[1:]) if self.evaluates else 0.0,
            self.eval_every_steps, statistics.median(self._saves), self.save_every_steps,
            self.steps_per_epoch)
        self.plan = dataclasses.replace(budget_plan,
                                        total_steps=self.agree(budget_plan.total_steps))
        self._planned_at = now
        return self.plan.total_steps

    def _refit(self, step: int, now: float) -> Optional[int]:
        steps_since = step - self.plan.planned_at_step
        if (step % self.log_every_steps
                or steps_since < max(MIN_STEPS_TO_PACE, self.eval_every_steps)):
            return None
        seconds_per_step = max(now - self._planned_at, 1e-9) / steps_since
        self.steps_per_second = 1 / seconds_per_step
        total = self.agree(refit(self.plan, step=step, planned_steps=self.plan.total_steps,
                                 elapsed_seconds=now - self.started_at,
                                 seconds_per_step=seconds_per_step, schedule=self.schedule,
                                 decay_fractions=self.decay_fractions))
        if total == self.plan.total_steps:
            return None
        self.plan = dataclasses.replace(self.plan, total_steps=total)
        return total


def _events_until(step: int, start: int, every: int) -> int:
    """Evaluations or checkpoints that fall in (start, step], the last step's included."""
    return step // every - start // every + (1 if step % every else 0)


def steps_that_fit(available_seconds: float, start_step: int, seconds_per_step: float,
                   eval_seconds: float, eval_every: int, save_seconds: float,
                   save_every: int) -> int:
    """The largest final step whose training, evaluations and checkpoints fit the time left.

    Starting at ``start_step``, reaching step N costs ``(N - start) x seconds_per_step`` (the
    loop's steps, as it runs them: calls, logging and all), one evaluation every
    ``eval_every`` steps and one checkpoint every ``save_every`` steps, the final evaluation
    and checkpoint included. The cost never falls as N grows: a binary search finds the
    largest N that fits (``start_step`` when none does).
    """
    if seconds_per_step <= 0:
        raise ValueError(f"seconds_per_step must be positive. Received: {seconds_per_step}")

    def cost(step: int) -> float:
        return ((step - start_step) * seconds_per_step
                + _events_until(step, start_step, eval_every) * eval_seconds
                + _events_until(step, start_step, save_every) * save_seconds)

    low, high = start_step, start_step + max(0, int(available_seconds // seconds_per_step))
    while low < high:
        middle = (low + high + 1) // 2
        if cost(middle) <= available_seconds:
            low = middle
        else:
            high = middle - 1
    return low


def plan(budget_seconds: float, elapsed_seconds: float, step: int, seconds_per_step: float,
         eval_seconds: float, eval_every: int, save_seconds: float, save_every: int,
         steps_per_epoch: int) -> BudgetPlan:
    """Plans the run's total steps; a ``UsageError`` when not one more step fits."""
    available = budget_seconds * (1 - RESERVE_SHARE) - elapsed_seconds
    total = steps_that_fit(available, step, seconds_per_step, eval_seconds, eval_every,
                           save_seconds, save_every)
    if total <= step:
        raise UsageError(
            f"--time_budget={budget_seconds:g}s leaves no time to train: {elapsed_seconds:.0f} s "
            f"went to setting up and measuring, and one step, evaluation and checkpoint take "
            f"{seconds_per_step:.2f}, {eval_seconds:.1f} and {save_seconds:.1f} s. Give a longer "
            "budget.")
    return BudgetPlan(budget_seconds=budget_seconds, planned_at_step=step,
                      planned_after_seconds=elapsed_seconds, seconds_per_step=seconds_per_step,
                      eval_seconds=eval_seconds, save_seconds=save_seconds, total_steps=total,
                      steps_per_epoch=steps_per_epoch)


def refit(budget_plan: BudgetPlan, *, step: int, planned_steps: int, elapsed_seconds: float,
          seconds_per_step: float, schedule: str, decay_fractions=()) -> int:
    """The total steps a running plan should have, at the pace since it was made.

    At ``seconds_per_step`` (evaluations and checkpoints included), the steps left must end
    inside the budget less its reserve: a run that would overrun it gets the total that fits
    (at least one more step). A run that would end early by more than ``LENGTHEN_SHARE`` of
    its plan gets the total that fits with the final evaluation and checkpoint set aside once
    more, so that the next refit does not shorten it again; a multistep schedule's, no
    further than keeps the decays it has passed behind it. Otherwise the plan stays.
    """
    left = budget_plan.budget_seconds * (1 - RESERVE_SHARE) - elapsed_seconds
    total = step + max(1, int(left / seconds_per_step))
    if total < planned_steps:
        return total
    longer = step + int((left - budget_plan.eval_seconds - budget_plan.save_seconds)
                        / seconds_per_step)
    if schedule == "multistep":
        longer = min(longer, longest_plan_keeping_decays(step, planned_steps, decay_fractions))
    return longer if longer > planned_steps * (1 + LENGTHEN_SHARE) else planned_steps


def longest_plan_keeping_decays(step: int, total_steps: int, decay_fractions) -> int:
    """The most steps a multistep schedule's plan may grow to at ``step``.

    A budgeted run decays after ``int(f x total)`` steps for each fraction ``f`` in (0, 1)
    (``config.plan_steps``): a longer plan moves those steps later, and one the run has passed
    must stay passed, or the rate would rise back by the decay factor. ``int(f x T) < step``
    holds while ``T < step / f``.
    """
    passed = [f for f in decay_fractions if int(f * total_steps) < step]
    return min((math.ceil(step / f) - 1 for f in passed), default=sys.maxsize)


def probe_seconds(budget_seconds: float) -> float:
    """How long to time training steps before planning."""
    return min(max(PROBE_SHARE * budget_seconds, MIN_PROBE_SECONDS), MAX_PROBE_SECONDS)


def load(model_dir: str) -> Optional[BudgetPlan]:
    path = os.path.join(model_dir, PLAN_FILENAME)
    if not os.path.exists(path):
        return None
    raw = jsonio.read(path, "Delete it to plan the budget again (the schedule then changes).")
    try:
        return BudgetPlan(**raw)
    except TypeError as error:
        raise UsageError(f"{path} is not a budget plan ({error}). Delete it to plan the budget "
                         "again (the schedule then changes).") from None


def save(model_dir: str, budget_plan: BudgetPlan) -> str:
    return jsonio.write(os.path.join(model_dir, PLAN_FILENAME), dataclasses.asdict(budget_plan))

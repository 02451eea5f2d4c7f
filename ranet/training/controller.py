"""The outer loop: when to log, evaluate, checkpoint and stop (orbit's Controller is the model).

What one step does is ``ranet.training.steps``; the controller only decides when. It runs the
compiled steps up to the next boundary (a log, an evaluation, a checkpoint, the end) in one
call, then does what that boundary asks for.
"""

import dataclasses
import time
from typing import Optional

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from ranet.errors import DivergedError
from ranet.training import budget, distribute, model_dir
from ranet.training.preemption import PREEMPTED_EXIT_CODE, Preempted
from ranet.training.setup import Training


@dataclasses.dataclass
class _Probe:
    """What the loop timed while a time budget was still to plan."""
    started: float = dataclasses.field(default_factory=time.monotonic)
    steps: int = 0
    loop_seconds: float = 0.0        # compiled calls and log lines: the loop's steps
    evaluations: list = dataclasses.field(default_factory=list)
    saves: list = dataclasses.field(default_factory=list)

    def done(self, optim) -> bool:
        return (self.steps > 0 and
                time.monotonic() - self.started >= budget.probe_seconds(
                    optim.time_budget_seconds))


class _Progress:
    """Step rate and ETA over the whole run, for log lines.

    Timed from the end of the first compiled call, so tracing does not count, and again from
    a time budget's plan; the ETA shows days once there are any.
    """

    def __init__(self, start_step: int, total_steps: int):
        self.start_step, self.total_steps = start_step, total_steps
        self.start_time = time.monotonic()

    def eta(self, step: int) -> str:
        done = step - self.start_step
        if done <= 0:
            return "?"
        return format_duration((time.monotonic() - self.start_time) / done
                               * (self.total_steps - step))


@dataclasses.dataclass(frozen=True)
class _Planned:
    """When and at which step this process planned its time budget, and the plan."""
    at: float
    step: int
    budget_plan: budget.BudgetPlan


def format_duration(seconds: float) -> str:
    """``H:MM:SS``, with the days in front when there are any (``2d 04:47:07``)."""
    days, rest = divmod(int(round(seconds)), 86400)
    hours, rest = divmod(rest, 3600)
    text = f"{hours:02d}:{rest // 60:02d}:{rest % 60:02d}"
    return f"{days}d {text}" if days else text


def _loss_scale(optimizer) -> Optional[float]:
    if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        return float(optimizer.dynamic_scale.numpy())
    return None


def _write_scalars(writer, scalars: dict, step: int) -> None:
    with writer.as_default(step=step):
        for name, value in scalars.items():
            tf.summary.scalar(name, value)
    writer.flush()


class Controller:
    """Runs a training from its current step to its end (or ``stop_at_step``).

    Args:
        training: what ``setup.build`` made.
        manager: saves the checkpoints (``ckpt-<step>``).
        best: keeps the best checkpoint on validation.
        chief: whether this process writes records and summaries.
        train_writer, eval_writer: TensorBoard writers (no-op writers on other workers).
        budget_started_at: with ``--time_budget`` and no plan yet, when (``time.monotonic``)
            the budget began; the controller then measures and plans first (``budget``).
    """

    def __init__(self, training: Training, manager: tf.train.CheckpointManager,
                 best: model_dir.BestCheckpoint, *, chief: bool, train_writer, eval_writer,
                 budget_started_at: Optional[float] = None):
        self.training, self.manager, self.best, self.chief = training, manager, best, chief
        self.train_writer, self.eval_writer = train_writer, eval_writer
        self.budget_started_at = budget_started_at
        self._planned: Optional[_Planned] = None
        self.step = int(training.steps.global_step.numpy())
        self._window_steps, self._window_seconds = 0, 0.0  # training time, for images/s

    def run(self) -> dict:
        """Trains to the end; returns the last training-window and validation metrics.

        Raises ``FloatingPointError`` at the first step whose loss is not finite (nothing is
        saved after it), and ``Preempted`` once a stop was requested and a checkpoint saved.
        With a time budget to plan, the first ``budget.probe_seconds`` of the loop are the
        probe: then the plan sets where the run ends (``_plan_budget``).
        """
        runtime = self.training.config.runtime
        train_data = self.training.train_dataset(self.step)
        eval_data = self.training.validation_dataset()
        iterator = iter(train_data)
        train_metrics, eval_metrics, progress, probe = {}, {}, None, None
        try:
            plan = self.training.plan
            end_step = min(plan.total_steps, runtime.stop_at_step or plan.total_steps)
            while self.step < end_step:
                boundaries = [end_step]
                for interval in (runtime.log_every_steps, runtime.checkpoint_every_steps,
                                 plan.eval_every_steps):
                    boundaries.append((self.step // interval + 1) * interval)
                if self.budget_started_at is not None and self._planned is None:
                    # Probing: a step at a time, so that the probe ends when its time is up
                    # rather than at the next log line, however far that is.
                    boundaries.append(self.step + 1)
                started, before = time.monotonic(), self.step
                self._advance(iterator, min(boundaries) - self.step)
                at_end = self.step >= end_step
                if self.step % runtime.log_every_steps == 0 or at_end:
                    train_metrics = self._log(progress)
                    if self._planned is not None and not at_end and self._refit_plan():
                        plan = self.training.plan
                        progress.total_steps = plan.total_steps
                        end_step = min(plan.total_steps, runtime.stop_at_step or plan.total_steps)
                if progress is None:  # the first call compiled the step: time from here
                    progress = _Progress(self.step, plan.total_steps)
                    if self.budget_started_at is not None:
                        probe = _Probe()
                elif probe is not None:
                    probe.steps += self.step - before
                    probe.loop_seconds += time.monotonic() - started
                if eval_data is not None and (self.step % plan.eval_every_steps == 0 or at_end):
                    started = time.monotonic()
                    eval_metrics = self._evaluate(eval_data)
                    if probe is not None:
                        probe.evaluations.append(time.monotonic() - started)
                if self.step % runtime.checkpoint_every_steps == 0 or at_end:
                    started = time.monotonic()
                    model_dir.save(self.manager, self.step)
                    if probe is not None:
                        probe.saves.append(time.monotonic() - started)
                if probe is not None and probe.done(self.training.config.optim):
                    eval_metrics = self._plan_budget(probe, eval_data) or eval_metrics
                    probe, plan = None, self.training.plan
                    # The ETA is timed from here: the probe's extra evaluations do not recur.
                    progress = _Progress(self.step, plan.total_steps)
                    end_step = min(plan.total_steps, runtime.stop_at_step or plan.total_steps)
        finally:
            # An exception's traceback keeps this frame alive until the interpreter exits, and
            # a live distributed iterator then delays the exit by ~20 s (mirrored, 2 CPUs).
            del iterator, train_data, eval_data
        return {"step": self.step, "train": train_metrics, "validation": eval_metrics}

    def _advance(self, iterator, num_steps: int) -> None:
        """Runs up to ``num_steps`` steps in one compiled call; stops on a fault or a request."""
        steps = self.training.steps
        started = time.monotonic()
        outcome = steps.run_steps(iterator, tf.constant(num_steps))
        finite = bool(outcome["finite"])  # waits for the steps to finish
        previous, self.step = self.step, int(steps.global_step.numpy())
        self._window_steps += self.step - previous
        self._window_seconds += time.monotonic() - started
        if not finite:
            self._non_finite(previous)
        if bool(outcome["stop_requested"]):
            self._preempted()

    def _plan_budget(self, probe: "_Probe", eval_data) -> dict:
        """Plans the steps that fit from what the probe timed; returns any new evaluation.

        An evaluation or a checkpoint the probe did not see (or saw only the first, traced,
        run of) is run and timed here.
        """
        config = self.training.config
        eval_metrics = {}
        if eval_data is not None:
            while len(probe.evaluations) < 2:
                started = time.monotonic()
                eval_metrics = self._evaluate(eval_data)
                probe.evaluations.append(time.monotonic() - started)
        if not probe.saves:
            started = time.monotonic()
            model_dir.save(self.manager, self.step)
            probe.saves.append(time.monotonic() - started)
        plan = self.training.plan
        budget_plan = budget.plan(
            config.optim.time_budget_seconds, time.monotonic() - self.budget_started_at,
            self.step, probe.loop_seconds / probe.steps,
            # The first evaluation traces it: the later ones say what the others will cost.
            float(np.median(probe.evaluations[1:])) if eval_data is not None else 0.0,
            plan.eval_every_steps, float(np.median(probe.saves)),
            config.runtime.checkpoint_every_steps, plan.steps_per_epoch)
        # Every worker follows the chief's plan, so that all of them stop at the same step.
        total_steps = distribute.broadcast_from_chief(self.training.strategy,
                                                      budget_plan.total_steps)
        budget_plan = dataclasses.replace(budget_plan, total_steps=total_steps)
        if self.chief:
            budget.save(config.runtime.model_dir, budget_plan)
        logging.info("time budget: %s", budget_plan.describe())
        self.training = self.training.replan(total_steps)
        self._planned = _Planned(time.monotonic(), self.step, budget_plan)
        return eval_metrics

    def _refit_plan(self) -> bool:
        """Fits the plan to the pace since planning (``budget.refit``): shorter if the run has
        slowed, longer if it has sped up. The schedule follows. Returns whether it changed."""
        planned = self._planned
        if self.step - planned.step < max(budget.MIN_STEPS_TO_PACE,
                                          self.training.plan.eval_every_steps):
            return False
        now = time.monotonic()
        pace = (now - planned.at) / (self.step - planned.step)
        steps = self.training.plan.total_steps
        optim = self.training.config.optim
        total = budget.refit(planned.budget_plan, step=self.step, planned_steps=steps,
                             elapsed_seconds=now - self.budget_started_at,
                             seconds_per_step=pace, schedule=optim.schedule,
                             decay_fractions=optim.decay_fractions)
        total = distribute.broadcast_from_chief(self.training.strategy, total)
        if total == steps:
            return False
        logging.warning("time budget: the run %s to %.1f steps/s; %d steps fit, not %d: "
                        "the schedule now ends there",
                        "slowed" if total < steps else "sped up", 1 / pace, total, steps)
        budget_plan = dataclasses.replace(planned.budget_plan, total_steps=total)
        self._planned = dataclasses.replace(planned, budget_plan=budget_plan)
        if self.chief:
            budget.save(self.training.config.runtime.model_dir, budget_plan)
        self.training = self.training.replan(total)
        return True

    def _non_finite(self, previous: int) -> None:
        message = (f"non-finite training loss at step {self.step}; nothing was saved after step "
                   f"{previous}: the last good checkpoint is {self.manager.latest_checkpoint}. "
                   "Lower --learning_rate or check the input data.")
        logging.error("%s", message)
        raise DivergedError(message)

    def _preempted(self) -> None:
        path = model_dir.save(self.manager, self.step)
        message = (f"preempted: saved {path} at step {self.step}; run the same command again "
                   f"to resume. Exiting with status {PREEMPTED_EXIT_CODE}.")
        logging.warning("%s", message)
        raise Preempted(message, self.step)

    def _log(self, progress: Optional[_Progress]) -> dict:
        training = self.training
        metrics = training.steps.metrics.result()
        training.steps.metrics.reset()
        scalars = dict(metrics)
        scalars["learning_rate"] = float(training.optimizer.learning_rate.numpy())
        scalars["images_per_second"] = (self._window_steps * training.config.optim.batch_size
                                        / max(self._window_seconds, 1e-9))
        self._window_steps, self._window_seconds = 0, 0.0
        scale = _loss_scale(training.optimizer)
        if scale is not None:
            scalars["loss_scale"] = scale
        _write_scalars(self.train_writer, scalars, self.step)
        planning = self.budget_started_at is not None and self._planned is None
        logging.info("step %d/%s (epoch %.2f) loss %.4f last-exit acc %.3f | %.0f img/s | ETA %s",
                     self.step, "?" if planning else training.plan.total_steps,
                     self.step / training.plan.steps_per_epoch, metrics["loss/total"],
                     metrics[f"accuracy/exit_{training.model.num_exits}"],
                     scalars["images_per_second"],
                     "(timing the time budget)" if planning
                     else "?" if progress is None else progress.eta(self.step))
        return metrics

    def _evaluate(self, eval_data) -> dict:
        metrics = self.training.steps.eval_metrics(eval_data)
        accuracy = metrics[f"accuracy/exit_{self.training.model.num_exits}"]
        _write_scalars(self.eval_writer, {k: v for k, v in metrics.items() if k != "examples"},
                       self.step)
        improved = self.best.update(accuracy, self.step, write_record=self.chief)
        logging.info("validation at step %d: %s%s", self.step, " ".join(
            f"{k.split('/')[1][5:]}:{v:.3f}" for k, v in metrics.items()
            if k.startswith("accuracy/")), " (best)" if improved else "")
        return metrics

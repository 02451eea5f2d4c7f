"""The outer loop: when to log, evaluate, checkpoint and stop (orbit's Controller is the model).

What one step does is ``ranet.training.steps``; the controller only decides when. It runs the
compiled steps up to the next boundary (a log, an evaluation, a checkpoint, the end) in one
call, then does what that boundary asks for. With a time budget it then asks the budget
(``budget.TimeBudget``) whether the run's last step moves; the budget reads no clock.
"""

import time
from typing import Callable, Optional

import keras
import tensorflow as tf
from absl import logging

from ranet.errors import DivergedError
from ranet.training import budget, model_dir
from ranet.training.preemption import PREEMPTED_EXIT_CODE, Preempted
from ranet.training.setup import Training


class _Progress:
    """Step rate and ETA for log lines, timed from ``start_step`` at ``start_time``.

    Started after the first compiled call, so tracing does not count, and again at a time
    budget's plan, so the probe's extra evaluations do not either.
    """

    def __init__(self, start_step: int, start_time: float):
        self.start_step, self.start_time = start_step, start_time

    def eta(self, step: int, total_steps: int, now: float) -> str:
        done = step - self.start_step
        if done <= 0:
            return "?"
        return format_duration((now - self.start_time) / done * (total_steps - step))


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
        time_budget: with ``--time_budget`` and no plan yet, what decides where the run ends.
        clock: seconds, the clock ``time_budget`` was started on (tests pass a fake one).
    """

    def __init__(self, training: Training, manager: tf.train.CheckpointManager,
                 best: model_dir.BestCheckpoint, *, chief: bool, train_writer, eval_writer,
                 time_budget: Optional[budget.TimeBudget] = None,
                 clock: Callable[[], float] = time.monotonic):
        self.training, self.manager, self.best, self.chief = training, manager, best, chief
        self.train_writer, self.eval_writer = train_writer, eval_writer
        self.time_budget, self.clock = time_budget, clock
        self.step = int(training.steps.global_step.numpy())
        self.end_step = self._end_step()
        self._progress: Optional[_Progress] = None
        self._window_steps, self._window_seconds = 0, 0.0  # training time, for images/s

    def run(self) -> dict:
        """Trains to the end; returns the last training-window and validation metrics.

        Each round runs one compiled call to the next boundary, then its actions: log,
        evaluate, save, and with a time budget, ask it where the run now ends. Raises
        ``DivergedError`` at the first step whose loss is not finite (nothing is saved after
        it), and ``Preempted`` once a stop was requested and a checkpoint saved.
        """
        runtime = self.training.config.runtime
        train_data = self.training.train_dataset(self.step)
        eval_data = self.training.validation_dataset()
        iterator = iter(train_data)
        train_metrics, eval_metrics = {}, {}
        try:
            while self.step < self.end_step:
                started, before = self.clock(), self.step
                self._train(iterator, self._steps_to_next_boundary())
                at_end = self.step >= self.end_step
                if self.step % runtime.log_every_steps == 0 or at_end:
                    train_metrics = self._log()
                if self._progress is None:  # the first call traced the step: time from here
                    self._progress = _Progress(self.step, self.clock())
                train_seconds = self.clock() - started
                evaluation_seconds = save_seconds = None
                if eval_data is not None and self._evaluation_due(at_end):
                    started = self.clock()
                    eval_metrics = self._evaluate(eval_data)
                    evaluation_seconds = self.clock() - started
                if self._save_due(at_end):
                    started = self.clock()
                    model_dir.save(self.manager, self.step)
                    save_seconds = self.clock() - started
                if self.time_budget is not None and not at_end:
                    self._ask_budget(budget.Timings(self.step - before, train_seconds,
                                                    evaluation_seconds, save_seconds))
        finally:
            # An exception's traceback keeps this frame alive until the interpreter exits, and
            # a live distributed iterator then delays the exit by ~20 s (mirrored, 2 CPUs).
            del iterator, train_data, eval_data
        return {"step": self.step, "train": train_metrics, "validation": eval_metrics}

    def _end_step(self) -> int:
        """The plan's last step, or ``--stop_at_step`` when it comes first."""
        total = self.training.plan.total_steps
        return min(total, self.training.config.runtime.stop_at_step or total)

    def _steps_to_next_boundary(self) -> int:
        runtime, plan = self.training.config.runtime, self.training.plan
        boundary = min(self.end_step, *((self.step // every + 1) * every for every in (
            runtime.log_every_steps, runtime.checkpoint_every_steps, plan.eval_every_steps)))
        longest = None if self.time_budget is None else self.time_budget.longest_call()
        return boundary - self.step if longest is None else min(boundary - self.step, longest)

    def _evaluation_due(self, at_end: bool) -> bool:
        return (self.step % self.training.plan.eval_every_steps == 0 or at_end
                or (self.time_budget is not None and self.time_budget.wants_evaluation()))

    def _save_due(self, at_end: bool) -> bool:
        return (self.step % self.training.config.runtime.checkpoint_every_steps == 0 or at_end
                or (self.time_budget is not None and self.time_budget.wants_save()))

    def _train(self, iterator, num_steps: int) -> None:
        """Runs up to ``num_steps`` steps in one compiled call; stops on a fault or a request."""
        steps = self.training.steps
        started = self.clock()
        outcome = steps.run_steps(iterator, tf.constant(num_steps))
        finite = bool(outcome["finite"])  # waits for the steps to finish
        previous, self.step = self.step, int(steps.global_step.numpy())
        self._window_steps += self.step - previous
        self._window_seconds += self.clock() - started
        if not finite:
            self._non_finite(previous)
        if bool(outcome["stop_requested"]):
            self._preempted()

    def _ask_budget(self, timings: budget.Timings) -> None:
        """Moves the run's last step where the time budget says; the schedule follows and the
        chief writes the plan, so that a resumed run keeps it."""
        time_budget = self.time_budget
        planning, steps = not time_budget.planned, self.training.plan.total_steps
        total = time_budget.after(self.step, self.clock(), timings)
        if total is None:
            return
        if planning:
            logging.info("time budget: %s", time_budget.plan.describe())
            # The ETA is timed from here: the probe's extra evaluations do not recur.
            self._progress = _Progress(self.step, self.clock())
        else:
            logging.warning("time budget: the run %s to %.1f steps/s; %d steps fit, not %d: "
                            "the schedule now ends there", "slowed" if total < steps
                            else "sped up", time_budget.steps_per_second, total, steps)
        self.training.set_total_steps(total)
        self.end_step = self._end_step()
        if self.chief:
            budget.save(self.training.config.runtime.model_dir, time_budget.plan)

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

    def _log(self) -> dict:
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
        planning = self.time_budget is not None and not self.time_budget.planned
        total_steps = training.plan.total_steps
        logging.info("step %d/%s (epoch %.2f) loss %.4f last-exit acc %.3f | %.0f img/s | ETA %s",
                     self.step, "?" if planning else total_steps,
                     self.step / training.plan.steps_per_epoch, metrics["loss/total"],
                     metrics[f"accuracy/exit_{training.model.num_exits}"],
                     scalars["images_per_second"],
                     "(timing the time budget)" if planning
                     else "?" if self._progress is None
                     else self._progress.eta(self.step, total_steps, self.clock()))
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

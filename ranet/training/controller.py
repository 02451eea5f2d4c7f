"""The outer loop: when to log, evaluate, checkpoint and stop (orbit's Controller is the model).

What one step does is ``ranet.training.steps``; the controller only decides when. It runs the
compiled steps up to the next boundary (a log, an evaluation, a checkpoint, the end) in one
call, then does what that boundary asks for.
"""

import time
from typing import Optional

import keras
import tensorflow as tf
from absl import logging

from ranet.training import model_dir
from ranet.training.preemption import PREEMPTED_EXIT_CODE, Preempted
from ranet.training.setup import Training


class _Progress:
    """Step rate and ETA over the whole run, for log lines."""

    def __init__(self, start_step: int, total_steps: int):
        self.start_step, self.total_steps = start_step, total_steps
        self.start_time = time.time()

    def eta(self, step: int) -> str:
        done = step - self.start_step
        if done <= 0:
            return "?"
        seconds = (time.time() - self.start_time) / done * (self.total_steps - step)
        return time.strftime("%H:%M:%S", time.gmtime(seconds))


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
    """

    def __init__(self, training: Training, manager: tf.train.CheckpointManager,
                 best: model_dir.BestCheckpoint, *, chief: bool, train_writer, eval_writer):
        self.training, self.manager, self.best, self.chief = training, manager, best, chief
        self.train_writer, self.eval_writer = train_writer, eval_writer
        self.step = int(training.steps.global_step.numpy())

    def run(self) -> dict:
        """Trains to the end; returns the last training-window and validation metrics.

        Raises ``FloatingPointError`` at the first step whose loss is not finite (nothing is
        saved after it), and ``Preempted`` once a stop was requested and a checkpoint saved.
        """
        training = self.training
        runtime, plan, steps = training.config.runtime, training.plan, training.steps
        end_step = min(plan.total_steps, runtime.stop_at_step or plan.total_steps)
        train_data, eval_data = training.train_dataset(self.step), training.validation_dataset()
        iterator = iter(train_data)
        progress = _Progress(self.step, plan.total_steps)
        train_metrics, eval_metrics = {}, {}
        window_steps, window_seconds = 0, 0.0  # training time only, for images_per_second
        try:
            while self.step < end_step:
                boundaries = [end_step]
                for interval in (runtime.log_every_steps, runtime.checkpoint_every_steps,
                                 plan.eval_every_steps):
                    boundaries.append((self.step // interval + 1) * interval)
                started = time.time()
                outcome = steps.run_steps(iterator, tf.constant(min(boundaries) - self.step))
                finite = bool(outcome["finite"])  # waits for the steps to finish
                previous, self.step = self.step, int(steps.global_step.numpy())
                window_steps += self.step - previous
                window_seconds += time.time() - started
                if not finite:
                    self._non_finite(previous)
                if bool(outcome["stop_requested"]):
                    self._preempted()
                at_end = self.step >= end_step
                if self.step % runtime.log_every_steps == 0 or at_end:
                    train_metrics = self._log(window_steps, window_seconds, progress)
                    window_steps, window_seconds = 0, 0.0
                if eval_data is not None and (self.step % plan.eval_every_steps == 0 or at_end):
                    eval_metrics = self._evaluate(eval_data)
                if self.step % runtime.checkpoint_every_steps == 0 or at_end:
                    model_dir.save(self.manager, self.step)
        finally:
            # An exception's traceback keeps this frame alive until the interpreter exits, and
            # a live distributed iterator then delays the exit by ~20 s (mirrored, 2 CPUs).
            del iterator, train_data, eval_data
        return {"step": self.step, "train": train_metrics, "validation": eval_metrics}

    def _non_finite(self, previous: int) -> None:
        message = (f"non-finite training loss at step {self.step}; nothing was saved after step "
                   f"{previous}: the last good checkpoint is {self.manager.latest_checkpoint}. "
                   "Lower --learning_rate or check the input data.")
        logging.error("%s", message)
        raise FloatingPointError(message)

    def _preempted(self) -> None:
        path = model_dir.save(self.manager, self.step)
        message = (f"preempted: saved {path} at step {self.step}; run the same command again "
                   f"to resume. Exiting with status {PREEMPTED_EXIT_CODE}.")
        logging.warning("%s", message)
        raise Preempted(message, self.step)

    def _log(self, window_steps: int, window_seconds: float, progress: _Progress) -> dict:
        training = self.training
        metrics = training.steps.metrics.result()
        training.steps.metrics.reset()
        scalars = dict(metrics)
        scalars["learning_rate"] = float(training.optimizer.learning_rate.numpy())
        scalars["images_per_second"] = (window_steps * training.config.optim.batch_size
                                        / max(window_seconds, 1e-9))
        scale = _loss_scale(training.optimizer)
        if scale is not None:
            scalars["loss_scale"] = scale
        _write_scalars(self.train_writer, scalars, self.step)
        logging.info("step %d/%d (epoch %.2f) loss %.4f last-exit acc %.3f | %.0f img/s | ETA %s",
                     self.step, training.plan.total_steps,
                     self.step / training.plan.steps_per_epoch, metrics["loss/total"],
                     metrics[f"accuracy/exit_{training.model.num_exits}"],
                     scalars["images_per_second"], progress.eta(self.step))
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

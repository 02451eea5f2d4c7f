"""The outer training loop: when to log, evaluate, checkpoint and stop.

``train_and_evaluate(config)`` is the whole job, callable from tests without
flags. What one step does is in ``ranet.steps``; devices, strategy and
precision are set in ``ranet.runtime``.
"""

import dataclasses
import json
import math
import os
import time

import keras
import tensorflow as tf
from absl import logging

from ranet import config as config_lib
from ranet import data, optim, runtime
from ranet.checkpoints import BEST_SUBDIR, CHECKPOINT_SUBDIR
from ranet.models import get_model
from ranet.steps import StepFunctions

BEST_RECORD = "best.json"
FLAGS_RECORD = "flags.txt"


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


def _check_model_dir(config: config_lib.ExperimentConfig) -> None:
    """Fails early if model_dir cannot be written or holds a different experiment."""
    model_dir = config.runtime.model_dir
    try:
        os.makedirs(model_dir, exist_ok=True)
        probe = os.path.join(model_dir, ".write_test")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as error:
        raise ValueError(f"--model_dir={model_dir} is not writable ({error.strerror}). "
                         "Pick a directory you can write to.") from error
    if not os.path.exists(os.path.join(model_dir, config_lib.CONFIG_FILENAME)):
        if tf.train.latest_checkpoint(os.path.join(model_dir, CHECKPOINT_SUBDIR)):
            raise ValueError(f"--model_dir={model_dir} holds checkpoints but no "
                             f"{config_lib.CONFIG_FILENAME}; use a fresh --model_dir.")
        return
    saved = config_lib.load(model_dir)
    if saved.model != config.model:
        changed = {k: (v, getattr(config.model, k)) for k, v in
                   dataclasses.asdict(saved.model).items() if getattr(config.model, k) != v}
        raise ValueError(
            f"--model_dir={model_dir} holds checkpoints of another model configuration "
            f"(saved vs requested: {changed}). Use a new --model_dir, or the same model flags "
            "to resume.")
    data_fields = ("dataset", "validation_size", "split_seed")
    if any(getattr(saved.data, f) != getattr(config.data, f) for f in data_fields):
        raise ValueError(
            f"--model_dir={model_dir} was trained with a different data split "
            f"({', '.join(f'{f}={getattr(saved.data, f)}' for f in data_fields)}); resuming "
            "with another would leak validation images into training. Use the saved values.")


def _loss_scale(optimizer):
    if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        return float(optimizer.dynamic_scale.numpy())
    return None


def _write_scalars(writer, scalars: dict, step: int) -> None:
    with writer.as_default(step=step):
        for name, value in scalars.items():
            tf.summary.scalar(name, value)
    writer.flush()


class _BestCheckpoint:
    """Keeps the checkpoint with the best last-exit validation accuracy."""

    def __init__(self, checkpoint, directory: str):
        self.manager = tf.train.CheckpointManager(checkpoint, directory, max_to_keep=1)
        self.record_path = os.path.join(directory, BEST_RECORD)
        self.best = -1.0
        if os.path.exists(self.record_path):
            with open(self.record_path) as f:
                self.best = json.load(f)["accuracy"]

    def update(self, accuracy: float, step: int, write_record: bool) -> bool:
        if accuracy <= self.best:
            return False
        self.best = accuracy
        self.manager.save(checkpoint_number=step)
        if write_record:
            with open(self.record_path + ".tmp", "w") as f:
                json.dump({"accuracy": accuracy, "step": step}, f)
            os.replace(self.record_path + ".tmp", self.record_path)
        return True


def train_and_evaluate(config: config_lib.ExperimentConfig, flags_text: str = "") -> dict:
    """Trains (or resumes) the experiment in ``config.runtime.model_dir``.

    ``flags_text``, the resolved flags of the binary, is saved beside the
    config. Returns the last training-window metrics and validation metrics.
    """
    rt, oc = config.runtime, config.optim
    runtime.configure_host_devices(rt.num_cpu_devices)
    runtime.set_precision(rt.precision)
    strategy = runtime.create_strategy(rt)
    chief = runtime.is_chief(strategy)
    if rt.deterministic:
        keras.utils.set_random_seed(rt.seed)
        tf.config.experimental.enable_op_determinism()
    replicas = strategy.num_replicas_in_sync
    if oc.batch_size % replicas:
        raise ValueError(f"--batch_size={oc.batch_size} is global and must divide evenly over "
                         f"{replicas} replicas; use a multiple of {replicas}.")
    if chief:
        _check_model_dir(config)
    logging.info("runtime: %s", runtime.describe(strategy, rt))

    splits = data.load_splits(config.data)
    steps_per_epoch = data.steps_per_epoch(len(splits.train.labels), oc.batch_size)
    total_steps = optim.total_steps(oc, steps_per_epoch)

    workdir = runtime.WorkerDirectory(rt.model_dir, chief)
    with strategy.scope():
        keras.utils.set_random_seed(rt.seed)
        model = get_model(config.model)
        optimizer = optim.create_optimizer(oc, steps_per_epoch, rt.precision)
        optimizer.build(model.trainable_variables)
        steps = StepFunctions(model, optimizer, strategy, global_batch_size=oc.batch_size,
                              weight_decay=oc.weight_decay, label_smoothing=oc.label_smoothing,
                              exit_weights=oc.exit_weights, xla=rt.xla)
        checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer,
                                         global_step=steps.global_step)
        manager = tf.train.CheckpointManager(
            checkpoint, os.path.join(workdir.path, CHECKPOINT_SUBDIR),
            max_to_keep=rt.keep_checkpoints, step_counter=steps.global_step)
        if manager.latest_checkpoint:
            checkpoint.restore(manager.latest_checkpoint).assert_existing_objects_matched()
            logging.info("resumed from %s", manager.latest_checkpoint)
        best = _BestCheckpoint(checkpoint, os.path.join(workdir.path, BEST_SUBDIR))
    if chief:
        config_lib.save(config, rt.model_dir)
        if flags_text:
            with open(os.path.join(rt.model_dir, FLAGS_RECORD), "w") as f:
                f.write(flags_text)

    step = int(steps.global_step.numpy())
    train_writer = (tf.summary.create_file_writer(os.path.join(rt.model_dir, "train")) if chief
                    else tf.summary.create_noop_writer())
    eval_writer = (tf.summary.create_file_writer(os.path.join(rt.model_dir, "validation"))
                   if chief else tf.summary.create_noop_writer())
    train_data = strategy.distribute_datasets_from_function(data.train_input_fn(
        splits.train, global_batch_size=oc.batch_size, mean=splits.mean, std=splits.std,
        seed=rt.seed, augment=config.data.augment, start_step=step))
    has_validation = len(splits.validation.labels) > 0
    eval_data = (strategy.distribute_datasets_from_function(data.eval_input_fn(
        splits.validation, global_batch_size=oc.batch_size, mean=splits.mean, std=splits.std))
        if has_validation else None)
    eval_every = rt.eval_every_epochs * steps_per_epoch
    logging.info("%s: %d steps (%d per epoch, global batch %d over %d replicas), starting at %d",
                 config.model.name, total_steps, steps_per_epoch, oc.batch_size, replicas, step)

    iterator = iter(train_data)
    progress = _Progress(step, total_steps)
    train_metrics, eval_metrics = {}, {}
    end_step = min(total_steps, rt.stop_at_step or total_steps)
    while step < end_step:
        boundaries = [end_step]
        for interval in (rt.log_every_steps, rt.checkpoint_every_steps, eval_every):
            boundaries.append((step // interval + 1) * interval)
        num_steps = min(boundaries) - step
        started = time.time()
        steps.train_loop(iterator, tf.constant(num_steps))
        step = int(steps.global_step.numpy())  # waits for the steps to finish
        elapsed = time.time() - started

        at_end = step >= end_step
        if step % rt.log_every_steps == 0 or at_end:
            train_metrics = steps.metrics.result()
            steps.metrics.reset()
            if rt.precision == "fp32" and not math.isfinite(train_metrics["loss/total"]):
                raise FloatingPointError(
                    f"non-finite training loss at step {step} (in steps {step - num_steps + 1}-"
                    f"{step}); the last good checkpoint is {manager.latest_checkpoint}. Lower "
                    "--learning_rate or check the input data.")
            scalars = dict(train_metrics)
            scalars["learning_rate"] = float(optimizer.learning_rate.numpy())
            scalars["images_per_second"] = num_steps * oc.batch_size / max(elapsed, 1e-9)
            scale = _loss_scale(optimizer)
            if scale is not None:
                scalars["loss_scale"] = scale
            _write_scalars(train_writer, scalars, step)
            logging.info("step %d/%d (epoch %.2f) loss %.4f last-exit acc %.3f | %.0f img/s | "
                         "ETA %s", step, total_steps, step / steps_per_epoch,
                         train_metrics["loss/total"],
                         train_metrics[f"accuracy/exit_{model.num_exits}"],
                         scalars["images_per_second"], progress.eta(step))
        if has_validation and (step % eval_every == 0 or at_end):
            eval_metrics = steps.eval_metrics(eval_data)
            accuracy = eval_metrics[f"accuracy/exit_{model.num_exits}"]
            _write_scalars(eval_writer, {k: v for k, v in eval_metrics.items()
                                         if k != "examples"}, step)
            improved = best.update(accuracy, step, write_record=chief)
            logging.info("validation at step %d: %s%s", step, " ".join(
                f"{k.split('/')[1][5:]}:{v:.3f}" for k, v in eval_metrics.items()
                if k.startswith("accuracy/")), " (best)" if improved else "")
        if step % rt.checkpoint_every_steps == 0 or at_end:
            manager.save(checkpoint_number=step)
    workdir.cleanup()
    return {"step": step, "train": train_metrics, "validation": eval_metrics}

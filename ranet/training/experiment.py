"""The outer training loop: when to log, evaluate, checkpoint and stop.

``train_and_evaluate(config)`` is the whole job, callable from tests without
flags. What one step does is in ``ranet.steps``; devices, strategy and
precision are set in ``ranet.runtime``.
"""

import contextlib
import dataclasses
import errno
import glob
import json
import math
import os
import shutil
import time
import zlib

import keras
import tensorflow as tf
from absl import logging

from ranet import config as config_lib
from ranet import data, optim, runtime
from ranet import checkpoints
from ranet.checkpoints import BEST_SUBDIR, CHECKPOINT_SUBDIR
from ranet.models import get_model
from ranet.steps import StepFunctions

BEST_RECORD = "best.json"
FLAGS_RECORD = "flags.txt"

# Exit statuses of a resumable stop: run the same command again to resume. Both lie in
# 128-255, which schedulers such as Kubeflow's TFJob (restartPolicy: ExitCode) retry.
PREEMPTED_EXIT_CODE = 143      # SIGTERM: a checkpoint was saved at the step it stopped
WORKER_LOST_EXIT_CODE = 144    # multi-worker: another worker died or stopped answering

# TensorFlow errors a collective raises when a peer dies, hangs or cannot be reached.
_PEER_ERRORS = (tf.errors.UnavailableError, tf.errors.DeadlineExceededError,
                tf.errors.CancelledError, tf.errors.AbortedError)


class TrainingInterrupted(SystemExit):
    """A resumable stop: ends the process with ``exit_code``, no traceback.

    A ``SystemExit`` so that the binary needs no handler; in-process callers catch it
    like any exception (``pytest.raises(Preempted)``). The message is logged when raised.
    """
    exit_code = 1

    def __init__(self, message: str, step: int):
        super().__init__(self.exit_code)
        self.message, self.step = message, step

    def __str__(self) -> str:
        return self.message


class Preempted(TrainingInterrupted):
    """SIGTERM arrived: every worker saved a checkpoint at the same step boundary."""
    exit_code = PREEMPTED_EXIT_CODE


class WorkerLost(TrainingInterrupted):
    """Multi-worker: a collective failed because another worker died or hung."""
    exit_code = WORKER_LOST_EXIT_CODE


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


_WRITE_FAILURES = {
    errno.ENOSPC: "its disk is full", errno.EDQUOT: "the disk quota is exhausted",
    errno.EROFS: "it is on a read-only file system", errno.EACCES: "permission denied",
    errno.EPERM: "permission denied", errno.ENOTDIR: "part of the path is a file",
}


def _check_writable(model_dir: str) -> None:
    """Creates model_dir and writes a probe file in it, or fails with the reason."""
    probe = os.path.join(model_dir, ".write_test")
    try:
        os.makedirs(model_dir, exist_ok=True)
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as error:
        with contextlib.suppress(OSError):
            os.remove(probe)
        why = _WRITE_FAILURES.get(error.errno)
        raise ValueError(
            f"--model_dir={model_dir} is not writable ({why + ': ' if why else ''}"
            f"{error.strerror}). Free space or pick a directory you can write to.") from error


def _check_free_space(directory: str, variables, keep: int) -> None:
    """Fails before training when the checkpoints to come cannot fit on the disk."""
    one = sum(math.prod(v.shape) * tf.as_dtype(v.dtype).size for v in variables)
    copies = keep + 2  # the kept ones, the best one, and the next one while it is written
    free = shutil.disk_usage(directory).free
    if free < one * copies:
        raise ValueError(
            f"--model_dir={directory} has {free / 2**20:.1f} MiB free but its checkpoints need "
            f"about {one * copies / 2**20:.1f} MiB ({copies} x {one / 2**20:.1f} MiB: "
            f"--keep_checkpoints={keep}, the best one and the one being written). Free space, "
            "lower --keep_checkpoints or pick another --model_dir.")


def _check_model_dir(config: config_lib.ExperimentConfig) -> None:
    """Fails early if model_dir cannot be written or holds a different experiment."""
    model_dir = config.runtime.model_dir
    _check_writable(model_dir)
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
    """Keeps the checkpoint with the best last-exit validation accuracy.

    Every worker reads the chief's record (``record_dir``), so that all of them take the
    same decision; each saves into its own ``directory``.
    """

    def __init__(self, checkpoint, directory: str, record_dir: str):
        self.manager = tf.train.CheckpointManager(checkpoint, directory, max_to_keep=1)
        self.record_path = os.path.join(directory, BEST_RECORD)
        self.best = -1.0
        chief_record = os.path.join(record_dir, BEST_RECORD)
        if os.path.exists(chief_record):
            with open(chief_record) as f:
                self.best = json.load(f)["accuracy"]

    def update(self, accuracy: float, step: int, write_record: bool) -> bool:
        if accuracy <= self.best:
            return False
        self.best = accuracy
        _save(self.manager, step)
        if write_record:
            with open(self.record_path + ".tmp", "w") as f:
                json.dump({"accuracy": accuracy, "step": step}, f)
            os.replace(self.record_path + ".tmp", self.record_path)
        return True


def _save(manager: tf.train.CheckpointManager, step: int) -> str:
    """``manager.save`` with an error that says what is left when the disk refuses."""
    try:
        return manager.save(checkpoint_number=step)
    except (OSError, tf.errors.OpError) as error:
        reason = getattr(error, "message", None) or str(error)
        raise RuntimeError(
            f"could not save the checkpoint of step {step} in {manager.directory} ({reason}). "
            f"The last complete checkpoint, {manager.latest_checkpoint}, is intact: free space "
            "or fix permissions, then run the same command again to resume from it.") from error


def _remove_partial_saves(directory: str) -> None:
    """Deletes the ``ckpt-N_temp/`` folders of saves that a killed process left unfinished.

    TensorFlow writes a checkpoint's shards there, renames them into place and rewrites the
    ``checkpoint`` state file (atomically, write-then-rename) only after both files exist,
    so such a folder is never the latest checkpoint, only litter.
    """
    for path in glob.glob(os.path.join(directory, "*_temp")):
        logging.warning("removing %s, left by a save that did not finish", path)
        shutil.rmtree(path, ignore_errors=True)


@tf.function
def _sums(strategy, values):
    """Sum over every replica of ``values`` and of their squares."""
    per_replica = strategy.run(lambda: tf.concat([values, values * values], axis=0))
    return strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None)


def _check_workers_agree(strategy: tf.distribute.Strategy, config: config_lib.ExperimentConfig,
                         step: int) -> None:
    """Multi-worker: every worker must run the same configuration from the same step.

    Otherwise their collectives stop matching and they wait on each other until
    --collective_timeout_seconds. Values agree iff n * sum(v**2) == sum(v)**2.
    """
    settings = config_lib.to_dict(config)
    settings["data"].pop("data_dir")  # each machine may read its own copy
    fingerprint = zlib.crc32(json.dumps(settings, sort_keys=True).encode()) % 2**20
    n = strategy.num_replicas_in_sync
    sums = _sums(strategy, tf.constant([step, fingerprint], tf.int64)).numpy().tolist()
    (step_sum, fingerprint_sum), (step_squares, fingerprint_squares) = sums[:2], sums[2:]
    if n * fingerprint_squares != fingerprint_sum ** 2:
        raise ValueError("the workers were started with different flags; start every worker "
                         "with the same command (only TF_CONFIG and --data_dir may differ).")
    if n * step_squares != step_sum ** 2:
        raise ValueError(
            f"workers resumed from different steps (this one from {step}; the mean is "
            f"{step_sum / n:g}): every worker must read the chief's checkpoints, i.e. "
            "--model_dir must be the same shared folder on every worker.")


def _peer_error_summary(error: tf.errors.OpError) -> str:
    """The informative tail of a collective's error, without the graph traceback."""
    tail = error.message.strip().split("\n\n")[-1]
    lines = [line.strip() for line in tail.splitlines()
             if line.strip() and not line.lstrip().startswith("[[")]
    summary = " ".join(lines)
    return summary if len(summary) <= 400 else summary[:400] + "..."


def train_and_evaluate(config: config_lib.ExperimentConfig, flags_text: str = "") -> dict:
    """Trains (or resumes) the experiment in ``config.runtime.model_dir``.

    ``flags_text``, the resolved flags of the binary, is saved beside the
    config. Returns the last training-window metrics and validation metrics.

    Stops: raises ``Preempted`` (exit status 143) after SIGTERM, once every worker saved a
    checkpoint at the same step; ``WorkerLost`` (144) when another worker of a multi-worker
    run dies or hangs past --collective_timeout_seconds; ``FloatingPointError`` at the first
    step whose loss is not finite (except under mixed_float16, whose loss scaling skips such
    steps), before anything is saved after it. Running the same command again resumes from
    the chief's latest readable checkpoint.
    """
    rt = config.runtime
    runtime.configure_host_devices(rt.num_cpu_devices)
    runtime.set_precision(rt.precision)
    strategy = runtime.create_strategy(rt)
    # Created outside strategy.scope(): one local flag per worker.
    watcher = runtime.PreemptionWatcher()
    workdir = None
    try:
        with watcher:
            workdir = runtime.WorkerDirectory(rt.model_dir, runtime.is_chief(strategy),
                                              task=runtime.task_name(strategy))
            return _train(config, flags_text, strategy, watcher, workdir)
    except _PEER_ERRORS as error:  # while setting up: the loop raises WorkerLost itself
        if runtime.num_workers(strategy) == 1:
            raise
        raise _worker_lost(error, None, config) from error
    finally:
        if workdir is not None:
            workdir.cleanup()


def _worker_lost(error: tf.errors.OpError, step, config: config_lib.ExperimentConfig) -> WorkerLost:
    where = f"after step {step}" if step is not None else "before training"
    summary = _peer_error_summary(error)
    if isinstance(error, tf.errors.DeadlineExceededError) or "timed out" in summary:
        what = (f"a collective waited more than --collective_timeout_seconds="
                f"{config.runtime.collective_timeout_seconds:g} for another worker {where} "
                "(is one stuck, or started with other flags?)")
    else:
        what = f"lost contact with another worker {where}"
    message = (f"{what}: {summary} Check the other workers' logs for the first failure, then "
               "relaunch every worker with the same command: training resumes from the "
               "chief's latest checkpoint in "
               f"{os.path.join(config.runtime.model_dir, CHECKPOINT_SUBDIR)}. Exiting with "
               f"status {WORKER_LOST_EXIT_CODE}.")
    logging.error("%s", message)
    return WorkerLost(message, step)


def _train(config: config_lib.ExperimentConfig, flags_text: str, strategy, watcher,
           workdir: "runtime.WorkerDirectory") -> dict:
    rt, oc = config.runtime, config.optim
    chief = workdir.chief
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

    # Every worker resumes from the chief's checkpoints; each saves into its own folder.
    chief_checkpoints = os.path.join(rt.model_dir, CHECKPOINT_SUBDIR)
    with strategy.scope():
        keras.utils.set_random_seed(rt.seed)
        model = get_model(config.model)
        optimizer = optim.create_optimizer(oc, steps_per_epoch, rt.precision)
        optimizer.build(model.trainable_variables)
        steps = StepFunctions(model, optimizer, strategy, global_batch_size=oc.batch_size,
                              weight_decay=oc.weight_decay, label_smoothing=oc.label_smoothing,
                              exit_weights=oc.exit_weights, xla=rt.xla,
                              stop_on_nonfinite=rt.precision != "mixed_float16",
                              stop_request=watcher.flag)
        checkpoint = tf.train.Checkpoint(**checkpoints.trackables(model, optimizer),
                                         global_step=steps.global_step)
        manager = tf.train.CheckpointManager(
            checkpoint, os.path.join(workdir.path, CHECKPOINT_SUBDIR),
            max_to_keep=rt.keep_checkpoints, step_counter=steps.global_step)
        _check_free_space(workdir.path, model.variables + optimizer.variables,
                          rt.keep_checkpoints)
        if chief:
            _remove_partial_saves(chief_checkpoints)
            _remove_partial_saves(os.path.join(rt.model_dir, BEST_SUBDIR))
        restored = checkpoints.restore_newest_readable(checkpoint, chief_checkpoints)
        if restored:
            logging.info("resumed from %s", restored)
        best = _BestCheckpoint(checkpoint, os.path.join(workdir.path, BEST_SUBDIR),
                               record_dir=os.path.join(rt.model_dir, BEST_SUBDIR))
    step = int(steps.global_step.numpy())
    workers = runtime.num_workers(strategy)
    if workers > 1:
        _check_workers_agree(strategy, config, step)
    if chief:
        config_lib.save(config, rt.model_dir)
        if flags_text:
            with open(os.path.join(rt.model_dir, FLAGS_RECORD), "w") as f:
                f.write(flags_text)

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
    window_steps, window_seconds = 0, 0.0  # training time only, for images_per_second
    end_step = min(total_steps, rt.stop_at_step or total_steps)
    try:
        while step < end_step:
            boundaries = [end_step]
            for interval in (rt.log_every_steps, rt.checkpoint_every_steps, eval_every):
                boundaries.append((step // interval + 1) * interval)
            num_steps = min(boundaries) - step
            started = time.time()
            outcome = steps.train_loop(iterator, tf.constant(num_steps))
            finite = bool(outcome["finite"])  # waits for the steps to finish
            previous, step = step, int(steps.global_step.numpy())
            window_steps += step - previous
            window_seconds += time.time() - started
            if not finite:
                message = (f"non-finite training loss at step {step}; nothing was saved after "
                           f"step {previous}: the last good checkpoint is "
                           f"{manager.latest_checkpoint}. Lower --learning_rate or check the "
                           "input data.")
                logging.error("%s", message)
                raise FloatingPointError(message)
            if bool(outcome["stop_requested"]):
                path = _save(manager, step)
                message = (f"preempted: saved {path} at step {step}; run the same command again "
                           f"to resume. Exiting with status {PREEMPTED_EXIT_CODE}.")
                logging.warning("%s", message)
                raise Preempted(message, step)

            at_end = step >= end_step
            if step % rt.log_every_steps == 0 or at_end:
                train_metrics = steps.metrics.result()
                steps.metrics.reset()
                scalars = dict(train_metrics)
                scalars["learning_rate"] = float(optimizer.learning_rate.numpy())
                scalars["images_per_second"] = (window_steps * oc.batch_size
                                                / max(window_seconds, 1e-9))
                window_steps, window_seconds = 0, 0.0
                scale = _loss_scale(optimizer)
                if scale is not None:
                    scalars["loss_scale"] = scale
                _write_scalars(train_writer, scalars, step)
                logging.info("step %d/%d (epoch %.2f) loss %.4f last-exit acc %.3f | %.0f img/s "
                             "| ETA %s", step, total_steps, step / steps_per_epoch,
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
                _save(manager, step)
    except _PEER_ERRORS as error:
        if workers == 1:
            raise
        raise _worker_lost(error, step, config) from error
    finally:
        # An exception's traceback keeps this frame alive until the interpreter exits, and a
        # live distributed iterator then delays the exit by ~20 s (mirrored, 2 CPU devices).
        del iterator, train_data, eval_data
    return {"step": step, "train": train_metrics, "validation": eval_metrics}

"""A model directory: its layout, the checks before writing into it, and its checkpoints.

    <model_dir>/config.json, flags.txt      the resolved configuration
    <model_dir>/checkpoints/ckpt-<step>     every --checkpoint_every_steps and at the end
    <model_dir>/checkpoints/best/           the best on validation, and best.json
    <model_dir>/train/, validation/         TensorBoard events

Checkpoints are keyed by variable name (``trackables``). ``restore_model`` rebuilds a trained
model for evaluation and export, falling back to the newest readable checkpoint as training does.
"""

import contextlib
import dataclasses
import errno
import glob
import hashlib
import math
import os
import re
import shutil
import tempfile
from typing import Dict, List, Optional, Sequence, Tuple

import tensorflow as tf
from absl import logging

from ranet import config as config_lib
from ranet import costs, devices, jsonio
from ranet.errors import MissingPathError, UsageError
from ranet.models import StagedClassifier, get_model

CHECKPOINT_SUBDIR = "checkpoints"
BEST_SUBDIR = os.path.join(CHECKPOINT_SUBDIR, "best")
BEST_RECORD = "best.json"
FLAGS_RECORD = "flags.txt"
TRAIN_EVENTS, VALIDATION_EVENTS = "train", "validation"
CHECKPOINT_CHOICES = ("best", "latest")
# Keras numbers a second optimizer instance in a process ("sgd_1"); checkpoints must not.
_INSTANCE_SUFFIX = re.compile(r"_\d+$")


# --------------------------------------------------------------------------------------------
# Before writing: can the directory take this run?

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
        raise UsageError(
            f"--model_dir={model_dir} is not writable ({why + ': ' if why else ''}"
            f"{error.strerror}). Free space or pick a directory you can write to.") from error


def check_free_space(directory: str, variables, keep: int) -> None:
    """Fails before training when the checkpoints to come cannot fit on the disk."""
    one = sum(math.prod(v.shape) * tf.as_dtype(v.dtype).size for v in variables)
    copies = keep + 2  # the kept ones, the best one, and the next one while it is written
    free = shutil.disk_usage(directory).free
    if free < one * copies:
        raise UsageError(
            f"--model_dir={directory} has {free / 2**20:.1f} MiB free but its checkpoints need "
            f"about {one * copies / 2**20:.1f} MiB ({copies} x {one / 2**20:.1f} MiB: "
            f"--keep_checkpoints={keep}, the best one and the one being written). Free space, "
            "lower --keep_checkpoints or pick another --model_dir.")


def check_model_dir(config: config_lib.ExperimentConfig) -> None:
    """Fails early if model_dir cannot be written or holds a different experiment."""
    model_dir = config.runtime.model_dir
    _check_writable(model_dir)
    if not os.path.exists(os.path.join(model_dir, config_lib.CONFIG_FILENAME)):
        if tf.train.latest_checkpoint(os.path.join(model_dir, CHECKPOINT_SUBDIR)):
            raise UsageError(f"--model_dir={model_dir} holds checkpoints but no "
                             f"{config_lib.CONFIG_FILENAME}; use a fresh --model_dir.")
        return
    saved = config_lib.load(model_dir)
    _check_same_model_and_split(saved, config, f"--model_dir={model_dir} holds checkpoints of",
                                "Use a new --model_dir, or the same flags to resume.")
    if saved.optim.trainable != config.optim.trainable:
        # The optimizer holds slots for the variables that train: another set would resume
        # some of them without their momentum.
        raise UsageError(f"--model_dir={model_dir} was trained with "
                         f"--trainable={saved.optim.trainable}, not "
                         f"--trainable={config.optim.trainable}. Resume with the same value, "
                         "or start a new --model_dir (with --init_from to keep the weights).")


def _check_same_model_and_split(saved: config_lib.ExperimentConfig,
                                config: config_lib.ExperimentConfig, what: str,
                                how_to_fix: str) -> None:
    """Fails if ``saved`` has another architecture or another validation split than ``config``."""
    if saved.model != config.model:
        changed = {k: (v, getattr(config.model, k)) for k, v in
                   dataclasses.asdict(saved.model).items() if getattr(config.model, k) != v}
        raise UsageError(f"{what} another model configuration (saved vs requested: "
                         f"{changed}). {how_to_fix}")
    data_fields = ("dataset", "validation_size", "split_seed")
    if any(getattr(saved.data, f) != getattr(config.data, f) for f in data_fields):
        raise UsageError(
            f"{what} a run with a different data split "
            f"({', '.join(f'{f}={getattr(saved.data, f)}' for f in data_fields)}); training "
            f"with another would leak validation images into training. {how_to_fix}")


def check_init_from(config: config_lib.ExperimentConfig) -> None:
    """Fails early if --init_from is not a model directory of this architecture and split."""
    source = config.runtime.init_from
    if not os.path.isdir(source):
        raise MissingPathError(f"--init_from={source} does not exist: pass the --model_dir "
                                "of a finished or interrupted ranet.train run.")
    _check_same_model_and_split(
        config_lib.load(source), config, f"--init_from={source} is",
        "Pass the architecture and data flags it was trained with (its config.json).")


def initialize_from(model: StagedClassifier, config: config_lib.ExperimentConfig) -> str:
    """Loads --init_from's weights (best, else latest checkpoint) into ``model``; returns the path.

    Only the model's variables are read: the optimizer's slots, the step and the schedule of
    the run that made them stay behind.
    """
    return _restore_weights(model, config.runtime.init_from, "best")


def write_config(config: config_lib.ExperimentConfig, flags_text: str) -> None:
    """Records the run's configuration (and the flags that made it) in its model directory."""
    config_lib.save(config, config.runtime.model_dir)
    if flags_text:
        with open(os.path.join(config.runtime.model_dir, FLAGS_RECORD), "w") as f:
            f.write(flags_text)


class WorkerDirectory:
    """The model directory for the chief; a throw-away directory for other workers.

    Every worker must take part in saving a checkpoint (mirrored variables are
    read collectively), but only the chief's copy is kept. A worker's folder is
    named after its task and the model directory, so that a relaunch after a
    SIGKILL (which leaves no chance to clean up) removes what the killed one left.
    """

    def __init__(self, model_dir: str, chief: bool, task: str = "worker"):
        self.chief = chief
        if chief:
            self.path = model_dir
            return
        digest = hashlib.sha1(os.path.abspath(model_dir).encode()).hexdigest()[:12]
        self.path = os.path.join(tempfile.gettempdir(), f"ranet_{task}_{digest}")
        shutil.rmtree(self.path, ignore_errors=True)
        os.makedirs(self.path)

    def cleanup(self) -> None:
        if not self.chief:
            shutil.rmtree(self.path, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# Saving.

class BestCheckpoint:
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
            self.best = jsonio.read(chief_record, "Delete it to start tracking the best "
                                    "checkpoint afresh.")["accuracy"]

    def update(self, accuracy: float, step: int, write_record: bool) -> bool:
        if accuracy <= self.best:
            return False
        self.best = accuracy
        save(self.manager, step)
        if write_record:
            jsonio.write(self.record_path, {"accuracy": accuracy, "step": step})
        return True


def save(manager: tf.train.CheckpointManager, step: int) -> str:
    """``manager.save`` with an error that says what is left when the disk refuses."""
    try:
        return manager.save(checkpoint_number=step)
    except (OSError, tf.errors.OpError) as error:
        reason = getattr(error, "message", None) or str(error)
        raise RuntimeError(
            f"could not save the checkpoint of step {step} in {manager.directory} ({reason}). "
            f"The last complete checkpoint, {manager.latest_checkpoint}, is intact: free space "
            "or fix permissions, then run the same command again to resume from it.") from error


def remove_partial_saves(directory: str) -> None:
    """Deletes the ``ckpt-N_temp/`` folders of saves that a killed process left unfinished.

    TensorFlow writes a checkpoint's shards there, renames them into place and rewrites the
    ``checkpoint`` state file (atomically, write-then-rename) only after both files exist,
    so such a folder is never the latest checkpoint, only litter.
    """
    for path in glob.glob(os.path.join(directory, "*_temp")):
        logging.warning("removing %s, left by a save that did not finish", path)
        shutil.rmtree(path, ignore_errors=True)



# --------------------------------------------------------------------------------------------
# Restoring.

def _by_name(variables, strip_instance: bool = False) -> Dict[str, tf.Variable]:
    named = {}
    for variable in variables:
        head, _, rest = variable.path.partition("/")
        key = f"{_INSTANCE_SUFFIX.sub('', head)}/{rest}" if strip_instance else variable.path
        if key in named:
            raise ValueError(f"two variables share the checkpoint key {key!r}")
        named[key] = variable
    return named


def trackables(model: StagedClassifier, optimizer=None) -> dict:
    """What a checkpoint holds, keyed by variable NAME (``stem1_conv/kernel``).

    ``tf.train.Checkpoint(model=model)`` would key a functional model's variables
    by layer position, so any change in the order a builder creates layers
    would load weights into the wrong layers (silently, where shapes agree).
    Layer names here are explicit and stable, so name keys survive refactoring.
    """
    objects = {"model": _by_name(model.variables)}
    if optimizer is not None:
        objects["optimizer"] = _by_name(optimizer.variables, strip_instance=True)
    return objects


def candidates(directory: str) -> List[str]:
    """Checkpoints of ``directory``, newest first, as its state file lists them."""
    try:
        state = tf.train.get_checkpoint_state(directory)
    except Exception as error:  # noqa: BLE001 - an unreadable state file: scan the folder
        logging.warning("unreadable checkpoint state in %s (%s); scanning for ckpt-* files",
                        directory, error)
        state = None
    if state is not None:
        paths = list(state.all_model_checkpoint_paths)
        if state.model_checkpoint_path in paths:
            paths.remove(state.model_checkpoint_path)
        return [state.model_checkpoint_path] + paths[::-1]
    numbered = []
    for index in glob.glob(os.path.join(directory, "ckpt-*.index")):
        match = re.fullmatch(r"ckpt-(\d+)\.index", os.path.basename(index))
        if match:
            numbered.append((int(match.group(1)), index[:-len(".index")]))
    return [path for _, path in sorted(numbered, reverse=True)]


def restore_newest_readable(checkpoint: tf.train.Checkpoint, directory: str,
                            partial: bool = False) -> Optional[str]:
    """Restores the newest readable checkpoint of ``directory``; None when it has none.

    A checkpoint that cannot be read (a crash of the machine, not of the process, can
    leave files the state file names but the disk never received) is skipped with a
    warning, and the one before it is used. ``partial``: ``checkpoint`` holds only part
    of what was saved (the model without its optimizer).
    """
    paths = candidates(directory)
    failures = []
    for path in paths:
        try:
            status = checkpoint.restore(path)
            if partial:
                status.expect_partial()
            status.assert_existing_objects_matched()
        except Exception as error:  # noqa: BLE001 - truncated files raise IndexError, too
            reason = f"{type(error).__name__}: " + (
                getattr(error, "message", None) or str(error)).strip().splitlines()[0]
            failures.append(f"{path} ({reason})")
            logging.warning("checkpoint %s cannot be restored (%s); trying the one before it",
                            path, reason)
            continue
        if failures:
            logging.warning("restored %s, not the newest (%s), which is unreadable",
                            path, paths[0])
        return path
    if paths:
        raise RuntimeError(
            f"no checkpoint in {directory} can be restored: {'; '.join(failures)}. Move them "
            "away to start over, or point --model_dir elsewhere.")
    return None


def restore_model(model_dir: str, which: str = "best",
                  precision: str = "fp32") -> Tuple[config_lib.ExperimentConfig, StagedClassifier, str]:
    """Rebuilds the model from ``config.json`` and loads its weights (no optimizer state).

    ``best``: the newest readable best-on-validation checkpoint, else the newest readable
    one; ``latest``: the newest readable one.

    Returns (config, model, checkpoint path). The model is built under
    ``precision``; the global Keras policy is restored afterwards.
    """
    config_lib.check_choice("checkpoint", which, CHECKPOINT_CHOICES)
    config = config_lib.load(model_dir)
    with devices.precision_policy(precision):
        model = get_model(config.model)
    return config, model, _restore_weights(model, model_dir, which)


@dataclasses.dataclass(frozen=True, eq=False)
class LoadedModel:
    """A trained model restored from its directory, with its name in a comparison and its
    cost."""
    name: str
    model_dir: str
    config: config_lib.ExperimentConfig
    model: StagedClassifier
    checkpoint: str
    cost: costs.ModelCost


def load_models(model_dirs: Sequence[str], checkpoint: str = "best",
                precision: str = "fp32") -> List[LoadedModel]:
    """Restores models to compare on the same images: they must share dataset and split.

    Names are the model names, made unique with the directory name where they repeat.
    """
    restored = [restore_model(d, checkpoint, precision) for d in model_dirs]
    split_fields = ("dataset", "validation_size", "test_size", "split_seed")
    first = restored[0][0].data
    for model_dir, (config, _, _) in zip(model_dirs[1:], restored[1:]):
        if any(getattr(config.data, f) != getattr(first, f) for f in split_fields):
            raise UsageError(f"{model_dir} was trained on another dataset or split than "
                             f"{model_dirs[0]}; models compared together must share them.")
    names = [config.model.name for config, _, _ in restored]
    return [LoadedModel(
        name=name if names.count(name) == 1 else f"{name} ({os.path.basename(d.rstrip('/'))})",
        model_dir=d, config=config, model=model, checkpoint=path, cost=costs.count(model))
        for name, d, (config, model, path) in zip(names, model_dirs, restored)]


def _restore_weights(model: StagedClassifier, model_dir: str, which: str) -> str:
    """Loads ``model``'s weights from ``model_dir`` (``which``: best or latest); returns the path."""
    checkpoint = tf.train.Checkpoint(**trackables(model))
    directories = [BEST_SUBDIR, CHECKPOINT_SUBDIR] if which == "best" else [CHECKPOINT_SUBDIR]
    for subdir in directories:
        path = restore_newest_readable(checkpoint, os.path.join(model_dir, subdir), partial=True)
        if path is not None:
            return path
    raise MissingPathError(
        f"{model_dir} has no checkpoint under {CHECKPOINT_SUBDIR}/: train it first with "
        f"python -m ranet.train --model_dir={model_dir} ...")

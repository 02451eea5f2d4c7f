"""Where a model directory keeps its checkpoints, and loading a trained model from one."""

import glob
import os
import re
from typing import Dict, List, Optional, Tuple

import keras
import tensorflow as tf
from absl import logging

from ranet import config as config_lib
from ranet.models import StagedClassifier, get_model

CHECKPOINT_SUBDIR = "checkpoints"
BEST_SUBDIR = os.path.join(CHECKPOINT_SUBDIR, "best")
CHOICES = ("best", "latest")
# Keras numbers a second optimizer instance in a process ("sgd_1"); checkpoints must not.
_INSTANCE_SUFFIX = re.compile(r"_\d+$")


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
    if which not in CHOICES:
        raise ValueError(f"checkpoint must be one of {', '.join(CHOICES)}. Received: {which!r}")
    config = config_lib.load(model_dir)
    previous = keras.mixed_precision.global_policy().name
    keras.mixed_precision.set_global_policy("float32" if precision == "fp32" else precision)
    try:
        model = get_model(config.model)
    finally:
        keras.mixed_precision.set_global_policy(previous)
    checkpoint = tf.train.Checkpoint(**trackables(model))
    directories = [BEST_SUBDIR, CHECKPOINT_SUBDIR] if which == "best" else [CHECKPOINT_SUBDIR]
    for subdir in directories:
        path = restore_newest_readable(checkpoint, os.path.join(model_dir, subdir), partial=True)
        if path is not None:
            return config, model, path
    raise FileNotFoundError(
        f"{model_dir} has no checkpoint under {CHECKPOINT_SUBDIR}/: train it first with "
        f"python -m ranet.train --model_dir={model_dir} ...")

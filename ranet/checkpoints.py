"""Where a model directory keeps its checkpoints, and loading a trained model from one."""

import os
import re
from typing import Dict, Tuple

import keras
import tensorflow as tf

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


def checkpoint_path(model_dir: str, which: str = "best") -> str:
    """The best-on-validation checkpoint (falling back to the latest), or the latest."""
    if which not in CHOICES:
        raise ValueError(f"checkpoint must be one of {', '.join(CHOICES)}. Received: {which!r}")
    latest = tf.train.latest_checkpoint(os.path.join(model_dir, CHECKPOINT_SUBDIR))
    best = tf.train.latest_checkpoint(os.path.join(model_dir, BEST_SUBDIR))
    path = (best or latest) if which == "best" else latest
    if path is None:
        raise FileNotFoundError(
            f"{model_dir} has no checkpoint under {CHECKPOINT_SUBDIR}/: train it first with "
            f"python -m ranet.train --model_dir={model_dir} ...")
    return path


def restore_model(model_dir: str, which: str = "best",
                  precision: str = "fp32") -> Tuple[config_lib.ExperimentConfig, StagedClassifier, str]:
    """Rebuilds the model from ``config.json`` and loads its weights (no optimizer state).

    Returns (config, model, checkpoint path). The model is built under
    ``precision``; the global Keras policy is restored afterwards.
    """
    config = config_lib.load(model_dir)
    path = checkpoint_path(model_dir, which)
    previous = keras.mixed_precision.global_policy().name
    keras.mixed_precision.set_global_policy("float32" if precision == "fp32" else precision)
    try:
        model = get_model(config.model)
    finally:
        keras.mixed_precision.set_global_policy(previous)
    tf.train.Checkpoint(**trackables(model)).restore(path).expect_partial() \
        .assert_existing_objects_matched()
    return config, model, path

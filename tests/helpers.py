"""What the tests share: the one tiny RANet, its synthetic data, model directories, events.

The tiny RANet and its data are the smoke preset's (``flags/ranet_smoke.cfg``): 3 flows,
3 exits, seconds to train on a CPU.
"""

import dataclasses
import glob
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import tensorflow as tf

from ranet import cli, costs
from ranet import config as config_lib

REPO_ROOT = Path(__file__).resolve().parents[1]
SMOKE = cli.preset_config("ranet_smoke")
TINY_RANET, SYNTHETIC_DATA = SMOKE.model, SMOKE.data
VGG16 = config_lib.ModelConfig(name="vgg16", num_classes=10)
# The tiny MSDNet of the reference fixture (tests/fixtures/msdnet/tiny): 3 exits, 3 scales,
# the finest dropped (with a transition) in its last block.
TINY_MSDNET = config_lib.ModelConfig(
    name="msdnet", num_classes=10, num_blocks=3, step_mode="even", step=1, base_layers=2,
    base_channels=8, growth_rate=4, growth_factors=(1, 2, 4), bottleneck_factors=(1, 2, 4))

# Two exits, four images, two classes, for operating points computed by hand. Exit 1 is sure
# and right on image 0, sure and wrong on image 1; exit 2 is right on all four.
HAND_EXIT_1 = [[0.9, 0.1], [0.8, 0.2], [0.4, 0.6], [0.45, 0.55]]
HAND_EXIT_2 = [[0.99, 0.01], [0.1, 0.9], [0.2, 0.8], [0.7, 0.3]]
HAND_LABELS = np.array([0, 1, 1, 0])
HAND_COST = costs.ModelCost("ranet", 1, [costs.ExitCost(1, 10_000_000, 1),
                                         costs.ExitCost(2, 30_000_000, 1)])


def hand_images():
    """Evaluation images for the hand-computed case: only the labels matter."""
    from ranet.data.report_images import EvaluationImages
    pixels = np.zeros((4, 1, 1, 3), np.uint8)
    return EvaluationImages(
        "validation", pixels, HAND_LABELS, "test", pixels, HAND_LABELS, num_classes=2,
        mean=np.full(3, 0.5, np.float32), std=np.full(3, 0.25, np.float32),
        training_pixels=pixels)


def loaded(name: str, evaluation):
    """A stand-in for a restored model in a comparison: its name and its evaluation's cost."""
    from types import SimpleNamespace
    return SimpleNamespace(name=name, cost=evaluation.cost, model_dir=evaluation.model_dir,
                           checkpoint=evaluation.checkpoint)


def experiment(model_dir, *, steps=20, batch_size=32, lr=SMOKE.optim.learning_rate,
               data=SYNTHETIC_DATA, model=TINY_RANET, **runtime) -> config_lib.ExperimentConfig:
    """A short training run of the tiny RANet in ``model_dir``; ``runtime`` overrides."""
    runtime = {"log_every_steps": 5, "checkpoint_every_steps": 10, **runtime}
    return config_lib.ExperimentConfig(
        data=data, model=model,
        optim=config_lib.OptimConfig(batch_size=batch_size, train_steps=steps, learning_rate=lr,
                                     reference_batch_size=batch_size),
        runtime=config_lib.RuntimeConfig(model_dir=str(model_dir), **runtime))


def event_scalars(model_dir, subdir="train") -> dict:
    """{tag: {step: value}} from the TensorBoard event files of one writer of a model dir."""
    values = {}
    for path in sorted(glob.glob(os.path.join(str(model_dir), subdir, "events.out.tfevents.*"))):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                number = float(tf.make_ndarray(value.tensor)) if value.HasField("tensor") \
                    else value.simple_value
                values.setdefault(value.tag, {})[event.step] = number
    return values


def write_model_dir(model_dir, model_config=TINY_RANET, data_config=SYNTHETIC_DATA,
                    with_checkpoint=True, logit_scale=1.0):
    """A model directory as ranet.train leaves it, without training: config.json and
    (optionally) one checkpoint of a seeded model whose exit kernels are multiplied by
    ``logit_scale`` (random exits give near-uniform softmaxes; sharpened, confidences spread).
    Returns the model, or None without a checkpoint."""
    import keras

    from ranet.models import get_model
    from ranet.training import model_dir as model_dir_lib

    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    config_lib.save(dataclasses.replace(
        SMOKE, data=data_config, model=model_config,
        runtime=config_lib.RuntimeConfig(model_dir=str(model_dir))), str(model_dir))
    if not with_checkpoint:
        return None
    keras.utils.set_random_seed(0)
    model = get_model(model_config)
    for stage in model.stages:
        for layer in stage.layers:
            if isinstance(layer, keras.layers.Dense):
                layer.kernel.assign(layer.kernel * logit_scale)
    tf.train.CheckpointManager(tf.train.Checkpoint(**model_dir_lib.trackables(model)),
                               str(model_dir / "checkpoints"), max_to_keep=1).save(checkpoint_number=1)
    return model


# The first lines of a child script that must run without TensorFlow: importing it or Keras
# fails from then on.
REFUSE_TENSORFLOW = """
import importlib.abc, sys

class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("tensorflow", "keras"):
            raise ImportError(f"{name} is not available here")

sys.meta_path.insert(0, Refuse())
"""


def python(*args, timeout: float, env=None, **kwargs) -> subprocess.CompletedProcess:
    """``python <args>`` in the repository root, as a user runs it, output captured."""
    return subprocess.run([sys.executable, *map(str, args)], cwd=REPO_ROOT,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", **(env or {})},
                          capture_output=True, text=True, timeout=timeout, **kwargs)


def tail(process: subprocess.CompletedProcess) -> str:
    return f"stdout:\n{process.stdout[-3000:]}\nstderr:\n{process.stderr[-3000:]}"


def wait_for_output(log: Path, needle: str, process: subprocess.Popen, timeout: float) -> None:
    """Returns once ``needle`` is in ``log``, the file ``process`` writes its output to.

    Fails with the output's tail if the process exits first or ``timeout`` seconds pass. A file
    rather than a pipe: a server that keeps logging never blocks on a pipe nobody reads.
    """
    deadline = time.monotonic() + timeout
    while True:
        exited = process.poll() is not None  # before the read: its last words count
        output = log.read_text(errors="replace")
        if needle in output:
            return
        if exited:
            raise AssertionError(f"exited ({process.returncode}) before {needle!r}:\n"
                                 f"{output[-3000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"no {needle!r} after {timeout:g} s:\n{output[-3000:]}")
        time.sleep(0.05)

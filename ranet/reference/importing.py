"""A checkpoint trained by a reference (yangle15/RANet-pytorch, kalviny/MSDNet-PyTorch) as a
ranet model directory.

``import_checkpoint`` reads what the reference's ``main.py`` saves (``{"state_dict": ...,
"epoch", "arch", "best_prec1", "optimizer"}``, keys prefixed ``module.`` by DataParallel),
or a bare state dict, without PyTorch (``torch_file``); fills the port's variables
(``mapping``); and writes ``config.json`` and ``checkpoints/ckpt-0``, which eval, export and
serving read as they read a directory ``ranet.train`` wrote. The inputs are normalised with
the reference's constants, not with statistics of the train split.
"""

import dataclasses
import os
import shutil
from typing import Dict, Mapping

import numpy as np
import tensorflow as tf
from absl import logging

from ranet import config as config_lib
from ranet import devices, models
from ranet.data import imagenet
from ranet.errors import MissingPathError, UsageError
from ranet.reference import mapping, torch_file
from ranet.training import model_dir as model_dir_lib

# transforms.Normalize constants of the references' dataloader.py (pixel / 255 units; the
# same in both).
REFERENCE_NORMALIZATION = {
    "cifar10": ((0.4914, 0.4824, 0.4467), (0.2471, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)),
    "imagenet": (imagenet.MEAN, imagenet.STD),
}


def state_dict_of(checkpoint, path: str) -> Dict[str, np.ndarray]:
    """The state dict inside what ``torch.save`` wrote: main.py's dict or a bare state dict."""
    if isinstance(checkpoint, Mapping) and "state_dict" in checkpoint:
        checkpoint = checkpoint["state_dict"]
    if not (isinstance(checkpoint, Mapping) and checkpoint and
            all(isinstance(k, str) and isinstance(v, np.ndarray) for k, v in checkpoint.items())):
        raise torch_file.CheckpointFormatError(
            f"{path} holds neither a state dict (names -> tensors) nor a dict with one under "
            "'state_dict' (what the reference's main.py saves)")
    return dict(checkpoint)


def with_reference_normalization(config: config_lib.ExperimentConfig) -> config_lib.ExperimentConfig:
    """``config`` normalising as the reference does, unless normalisation flags were given."""
    data = config.data
    if data.normalization_mean is not None:
        return config
    if data.dataset not in REFERENCE_NORMALIZATION:
        raise UsageError(f"the reference's normalisation for --dataset={data.dataset} is not "
                         "known; pass --normalization_mean and --normalization_std.")
    mean, std = REFERENCE_NORMALIZATION[data.dataset]
    return dataclasses.replace(config, data=dataclasses.replace(
        data, normalization_mean=mean, normalization_std=std))


def _check_destination(directory: str) -> None:
    if not directory:
        raise UsageError("--model_dir is required: the model directory to write.")
    if os.path.exists(directory) and os.listdir(directory):
        raise UsageError(f"--model_dir={directory} exists and is not empty; importing writes a "
                         "new model directory. Pick another path or remove it.")


def build_imported_model(config: config_lib.ExperimentConfig, state_dict) -> models.StagedClassifier:
    """The port's model of ``config`` with the reference ``state_dict``'s weights."""
    if config.model.name not in mapping.IMPORTABLE_MODELS:
        raise UsageError(f"checkpoints of {', '.join(mapping.IMPORTABLE_MODELS)} can be "
                         f"imported. Received: --model={config.model.name}")
    with devices.precision_policy("fp32"):
        model = models.get_model(config.model)
    for variable, value in mapping.assignments(model, state_dict, config.model):
        variable.assign(value)
    unread = mapping.unread_keys(mapping.strip_data_parallel(state_dict), config.model)
    if unread:
        logging.info("left out %d tensors of modules that no exit reads (%s ...)",
                     len(unread), unread[0])
    return model


def import_checkpoint(checkpoint_path: str, config: config_lib.ExperimentConfig) -> str:
    """Writes the model directory ``config.runtime.model_dir``; returns its checkpoint path.

    Nothing is written unless the checkpoint reads, matches the model and converts in full;
    the directory appears complete or not at all.
    """
    directory = config.runtime.model_dir
    _check_destination(directory)
    if not os.path.isfile(checkpoint_path):
        raise MissingPathError(f"--checkpoint={checkpoint_path} does not exist or is not a file")
    config = with_reference_normalization(config)
    state_dict = state_dict_of(torch_file.read(checkpoint_path), checkpoint_path)
    logging.info("read %d tensors from %s", len(state_dict), checkpoint_path)
    model = build_imported_model(config, state_dict)

    staging = f"{directory.rstrip(os.sep)}.importing"
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)
    try:
        config_lib.save(config, staging)
        checkpoint = tf.train.Checkpoint(**model_dir_lib.trackables(model))
        manager = tf.train.CheckpointManager(
            checkpoint, os.path.join(staging, model_dir_lib.CHECKPOINT_SUBDIR), max_to_keep=1)
        saved = manager.save(checkpoint_number=0)
        if os.path.exists(directory):
            os.rmdir(directory)
        os.replace(staging, directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    path = os.path.join(directory, os.path.relpath(saved, staging))
    logging.info("wrote %s (%s); evaluate it with python -m ranet.eval --model_dir=%s",
                 directory, path, directory)
    return path

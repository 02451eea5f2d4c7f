"""MSDNet trains through the same loop as RANet: strategies, precisions, IMTA's techniques."""

import dataclasses

import numpy as np
import pytest
import tensorflow as tf

from helpers import TINY_MSDNET
from helpers import event_scalars as _scalars
from helpers import experiment as _experiment
from ranet import config as config_lib
from ranet.training import train_and_evaluate


@pytest.mark.parametrize("strategy, precision", [
    ("mirrored", "mixed_bfloat16"),
    pytest.param("default", "fp32", marks=pytest.mark.slow)])
def test_msdnet_trains_with_exit_distillation_and_gradient_equilibrium(tmp_path, strategy,
                                                                       precision):
    config = _experiment(tmp_path, steps=20, model=TINY_MSDNET, lr=0.02, strategy=strategy,
                         num_cpu_devices=2 if strategy == "mirrored" else 0,
                         precision=precision, checkpoint_every_steps=20)
    config = dataclasses.replace(config, optim=dataclasses.replace(
        config.optim, exit_distillation=True, gradient_equilibrium=True))
    result = train_and_evaluate(config)
    scalars = _scalars(tmp_path)
    losses = scalars["loss/total"]
    assert result["step"] == 20
    assert losses[20] < losses[5], losses
    assert all(np.isfinite(result["validation"][f"loss/exit_{k}"]) for k in (1, 2, 3))
    assert tf.train.latest_checkpoint(str(tmp_path / "checkpoints")).endswith("ckpt-20")
    assert config_lib.load(str(tmp_path)).model == TINY_MSDNET

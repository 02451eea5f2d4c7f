"""A shrunken ImageNet RANet trains from TFRecord shards (issue 13): 224x224, 1000 classes."""

import json
import os

import numpy as np
import pytest

from ranet import cli
from ranet.training import train_and_evaluate
from tests.data.test_imagenet import write_shards

# The reference's ImageNet layout (7x7/2 stem, max-pool, wide heads), widths reduced.
SHRUNKEN_IMAGENET_RANET = [
    "--model=ranet", "--dataset=imagenet", "--scale_list=1-2-3-4", "--growth_factors=4-2-1-1",
    "--bottleneck_factors=4-2-1-1", "--base_channels=4", "--growth_rate=4", "--num_blocks=1",
    "--block_step=1", "--step=2"]


def imagenet_config(data_dir, model_dir, *extra):
    from absl import flags
    values = flags.FlagValues()
    cli.define_config_flags(values)
    values(["train", *SHRUNKEN_IMAGENET_RANET, f"--data_dir={data_dir}",
            f"--model_dir={model_dir}", "--validation_size=6", "--batch_size=4",
            "--train_steps=3", "--log_every_steps=1", "--checkpoint_every_steps=3",
            "--deterministic", *extra])
    return cli.experiment_config(values)


def test_three_steps_on_tfrecord_shards_then_a_resume(tmp_path):
    data_dir = write_shards(tmp_path / "imagenet")
    config = imagenet_config(data_dir, tmp_path / "model", "--strategy=one_device")
    assert config.model.imagenet and config.model.image_size == 224
    result = train_and_evaluate(config)
    assert result["step"] == 3
    validation = result["validation"]
    assert validation["examples"] == 6  # the class-balanced hold-out, each image once
    assert np.isfinite(validation["loss/exit_4"])
    saved = json.loads((tmp_path / "model" / "config.json").read_text())
    assert saved["data"]["dataset"] == "imagenet" and saved["model"]["imagenet"] is True
    assert sorted(os.listdir(tmp_path / "model" / "checkpoints"))[0] == "best"
    resumed = train_and_evaluate(imagenet_config(data_dir, tmp_path / "model",
                                                 "--strategy=one_device", "--train_steps=5"))
    assert resumed["step"] == 5
    # Evaluation and export read images into memory: they refuse ImageNet, and say so.
    from ranet import eval as eval_binary
    with pytest.raises(ValueError, match="ranet.eval reads its images into memory"):
        cli.call(eval_binary.main, eval_binary.define_flags,
                 [f"--model_dir={tmp_path / 'model'}", f"--report_dir={tmp_path / 'report'}"])

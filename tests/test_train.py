"""The training loop end to end: distribution, resume, precision, events, real data."""

import dataclasses
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import event_scalars as _scalars
from ranet import config as config_lib
from ranet import checkpoints, optim, trainer
from ranet.models import get_model

TINY_RANET = config_lib.ModelConfig(
    name="ranet", num_classes=10, scale_list=(1, 2), growth_factors=(2, 1),
    bottleneck_factors=(2, 1), base_channels=8, growth_rate=4, num_blocks=1, block_step=1, step=2)
SYNTHETIC = config_lib.DataConfig(dataset="synthetic", synthetic_train_size=1024,
                                  synthetic_test_size=64, validation_size=256)


def _experiment(model_dir, *, steps=20, batch_size=32, lr=0.05, data=SYNTHETIC, model=TINY_RANET,
                **runtime) -> config_lib.ExperimentConfig:
    runtime = {"log_every_steps": 5, "checkpoint_every_steps": 10, **runtime}
    return config_lib.ExperimentConfig(
        data=data, model=model,
        optim=config_lib.OptimConfig(batch_size=batch_size, train_steps=steps, learning_rate=lr,
                                     reference_batch_size=batch_size),
        runtime=config_lib.RuntimeConfig(model_dir=str(model_dir), **runtime))


def _restore_variables(model_dir, checkpoint_name, precision="fp32"):
    """Model and optimizer variables of a saved checkpoint, as (path, value) lists in order."""
    config = config_lib.load(model_dir)
    keras.mixed_precision.set_global_policy(
        "float32" if precision == "fp32" else precision)
    model = get_model(config.model)
    optimizer = optim.create_optimizer(config.optim, 1, precision)
    optimizer.build(model.trainable_variables)
    step = tf.Variable(0, dtype=tf.int64)
    checkpoint = tf.train.Checkpoint(**checkpoints.trackables(model, optimizer), global_step=step)
    checkpoint.restore(os.path.join(model_dir, "checkpoints", checkpoint_name)).expect_partial()
    keras.mixed_precision.set_global_policy("float32")
    return ([(v.path, v.numpy()) for v in model.variables],
            [(v.path, v.numpy()) for v in optimizer.variables], int(step.numpy()))


def test_mirrored_on_two_cpus_lowers_the_loss(tmp_path):
    result = trainer.train_and_evaluate(
        _experiment(tmp_path, strategy="mirrored", num_cpu_devices=2))
    assert result["step"] == 20
    losses = _scalars(tmp_path)["loss/total"]
    assert sorted(losses) == [5, 10, 15, 20]
    assert losses[20] < 0.7 * losses[5], losses
    assert result["validation"]["examples"] == SYNTHETIC.validation_size


def test_resume_continues_at_the_next_step_with_optimizer_state(tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    trainer.train_and_evaluate(_experiment(straight, steps=40, deterministic=True))
    trainer.train_and_evaluate(_experiment(resumed, steps=40, deterministic=True, stop_at_step=20))
    assert tf.train.latest_checkpoint(str(resumed / "checkpoints")).endswith("ckpt-20")
    _, momentum_at_20, step = _restore_variables(resumed, "ckpt-20")
    assert step == 20
    assert any(np.abs(v).sum() > 0 for k, v in momentum_at_20 if "momentum" in k)

    result = trainer.train_and_evaluate(_experiment(resumed, steps=40, deterministic=True))
    assert result["step"] == 40
    logged_steps = sorted(_scalars(resumed)["loss/total"])
    assert logged_steps == [5, 10, 15, 20, 25, 30, 35, 40]  # no step logged twice
    weights, slots, step = _restore_variables(resumed, "ckpt-40")
    expected_weights, expected_slots, _ = _restore_variables(straight, "ckpt-40")
    assert step == 40
    # Equal to the uninterrupted run only if weights, momentum, schedule position and data
    # position were all restored.
    for (name, value), (_, expected) in zip(weights + slots, expected_weights + expected_slots):
        np.testing.assert_allclose(value, expected, rtol=1e-5, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("precision", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision_trains_with_float32_logits(tmp_path, precision):
    result = trainer.train_and_evaluate(_experiment(tmp_path, precision=precision))
    scalars = _scalars(tmp_path)
    assert scalars["loss/total"][20] < scalars["loss/total"][5]
    assert np.isfinite(result["validation"]["loss/exit_2"])
    assert ("loss_scale" in scalars) == (precision == "mixed_float16")
    keras.mixed_precision.set_global_policy(precision)
    model = get_model(TINY_RANET)
    logits = model(np.zeros((2, 32, 32, 3), np.float32))
    assert [l.dtype for l in logits] == [tf.float32] * 2
    assert model.stages[0].get_layer("stem1_conv").compute_dtype == precision.split("_")[1]


def test_event_files_hold_every_scalar(tmp_path):
    trainer.train_and_evaluate(_experiment(tmp_path, steps=10))
    train, validation = _scalars(tmp_path, "train"), _scalars(tmp_path, "validation")
    for tag in ("loss/total", "loss/exit_1", "loss/exit_2", "accuracy/exit_1",
                "accuracy/exit_2", "learning_rate", "images_per_second"):
        assert sorted(train[tag]) == [5, 10], tag
    assert train["images_per_second"][10] > 0
    assert train["learning_rate"][5] == pytest.approx(0.05)
    for tag in ("loss/exit_1", "loss/exit_2", "accuracy/exit_1", "accuracy/exit_2"):
        assert 10 in validation[tag], tag
    assert os.path.exists(tmp_path / "config.json")
    assert config_lib.load(str(tmp_path)).model == TINY_RANET


def test_best_checkpoint_is_kept_beside_the_latest(tmp_path):
    trainer.train_and_evaluate(_experiment(tmp_path, steps=64, checkpoint_every_steps=32,
                                           keep_checkpoints=1))
    best = tf.train.latest_checkpoint(str(tmp_path / "checkpoints" / "best"))
    assert best is not None and os.path.exists(tmp_path / "checkpoints" / "best" / "best.json")
    assert tf.train.latest_checkpoint(str(tmp_path / "checkpoints")).endswith("ckpt-64")


def test_model_dir_of_another_model_is_refused(tmp_path):
    trainer.train_and_evaluate(_experiment(tmp_path, steps=5))
    other = dataclasses.replace(TINY_RANET, growth_rate=6)
    with pytest.raises(ValueError, match="another model configuration.*growth_rate"):
        trainer.train_and_evaluate(_experiment(tmp_path, steps=5, model=other))


def test_batch_must_divide_over_replicas(tmp_path):
    with pytest.raises(ValueError, match="multiple of 2"):
        trainer.train_and_evaluate(_experiment(tmp_path, batch_size=33, strategy="mirrored",
                                               num_cpu_devices=2))


def test_small_ranet_beats_chance_on_real_cifar10(tmp_path, real_cifar10):
    data = config_lib.DataConfig(dataset="cifar10", data_dir=str(real_cifar10),
                                 validation_size=5000)
    model = config_lib.ModelConfig(
        name="ranet", num_classes=10, scale_list=(1, 2, 3), growth_factors=(4, 2, 1),
        bottleneck_factors=(4, 2, 1), base_channels=8, growth_rate=4, num_blocks=1,
        block_step=1, step=2)
    result = trainer.train_and_evaluate(_experiment(
        tmp_path, steps=150, batch_size=128, lr=0.1, data=data, model=model,
        log_every_steps=50, checkpoint_every_steps=150))
    validation = result["validation"]
    assert validation["examples"] == 5000
    # Chance is 10%; 150 steps of the small preset reach ~40% on every exit.
    assert min(validation[f"accuracy/exit_{k}"] for k in (1, 2, 3)) > 0.25, validation

"""train_and_evaluate end to end, in-process: distribution, resume, precision, events, faults."""

import dataclasses
import logging
import os
import shutil

import keras
import numpy as np
import pytest
import tensorflow as tf

from helpers import SMOKE, TINY_RANET, write_model_dir
from helpers import event_scalars as _scalars
from helpers import experiment as _experiment
from ranet import config as config_lib
from ranet import devices
from ranet.models import get_model
from ranet.training import model_dir, optimizer, train_and_evaluate


def _restore_variables(directory, checkpoint_name, precision="fp32"):
    """Model and optimizer variables of a saved checkpoint, as (path, value) lists in order."""
    config = config_lib.load(directory)
    plan = config_lib.plan_steps(config.optim, config.runtime, steps_per_epoch=1)
    with devices.precision_policy(precision):
        model = get_model(config.model)
        sgd = optimizer.create_optimizer(
            config.optim, optimizer.learning_rate_schedule(config.optim, plan), precision)
        sgd.build(model.trainable_variables)
    step = tf.Variable(0, dtype=tf.int64)
    checkpoint = tf.train.Checkpoint(**model_dir.trackables(model, sgd), global_step=step)
    checkpoint.restore(os.path.join(directory, "checkpoints", checkpoint_name)).expect_partial()
    return ([(v.path, v.numpy()) for v in model.variables],
            [(v.path, v.numpy()) for v in sgd.variables], int(step.numpy()))


@pytest.mark.slow  # three trainings
def test_resume_continues_at_the_next_step_with_optimizer_state(tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train_and_evaluate(_experiment(straight, steps=40, deterministic=True))
    train_and_evaluate(_experiment(resumed, steps=40, deterministic=True, stop_at_step=20))
    assert tf.train.latest_checkpoint(str(resumed / "checkpoints")).endswith("ckpt-20")
    _, momentum_at_20, step = _restore_variables(resumed, "ckpt-20")
    assert step == 20
    assert any(np.abs(v).sum() > 0 for k, v in momentum_at_20 if "momentum" in k)

    result = train_and_evaluate(_experiment(resumed, steps=40, deterministic=True))
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


# float16 convolutions are slow on a CPU (14 s): the loss-scaled case runs in the slow tier.
@pytest.mark.parametrize("precision", [pytest.param("mixed_float16", marks=pytest.mark.slow),
                                       "mixed_bfloat16"])
def test_mixed_precision_trains_with_float32_logits(tmp_path, precision):
    # float16 convolutions are slow on a CPU: 10 steps.
    result = train_and_evaluate(_experiment(tmp_path, steps=10, precision=precision))
    scalars = _scalars(tmp_path)
    assert scalars["loss/total"][10] < scalars["loss/total"][5]
    assert np.isfinite(result["validation"]["loss/exit_3"])
    assert ("loss_scale" in scalars) == (precision == "mixed_float16")
    keras.mixed_precision.set_global_policy(precision)
    model = get_model(TINY_RANET)
    logits = model(np.zeros((2, 32, 32, 3), np.float32))
    assert [l.dtype for l in logits] == [tf.float32] * 3
    assert model.stages[0].get_layer("stem1_conv").compute_dtype == precision.split("_")[1]


def test_event_files_hold_every_scalar(tmp_path):
    train_and_evaluate(_experiment(tmp_path, steps=10))
    train, validation = _scalars(tmp_path, "train"), _scalars(tmp_path, "validation")
    for tag in ("loss/total", "loss/exit_1", "loss/exit_3", "accuracy/exit_1",
                "accuracy/exit_3", "learning_rate", "images_per_second"):
        assert sorted(train[tag]) == [5, 10], tag
    assert train["images_per_second"][10] > 0
    assert train["learning_rate"][5] == pytest.approx(SMOKE.optim.learning_rate)
    for tag in ("loss/exit_1", "loss/exit_3", "accuracy/exit_1", "accuracy/exit_3"):
        assert 10 in validation[tag], tag
    assert os.path.exists(tmp_path / "config.json")
    assert config_lib.load(str(tmp_path)).model == TINY_RANET


@pytest.mark.slow  # two trainings or more
def test_best_checkpoint_is_kept_beside_the_latest(tmp_path):
    train_and_evaluate(_experiment(tmp_path, steps=64, checkpoint_every_steps=32,
                                           keep_checkpoints=1))
    best = tf.train.latest_checkpoint(str(tmp_path / "checkpoints" / "best"))
    assert best is not None and os.path.exists(tmp_path / "checkpoints" / "best" / "best.json")
    assert tf.train.latest_checkpoint(str(tmp_path / "checkpoints")).endswith("ckpt-64")


def test_model_dir_of_another_model_is_refused(tmp_path):
    train_and_evaluate(_experiment(tmp_path, steps=5))
    other = dataclasses.replace(TINY_RANET, growth_rate=6)
    with pytest.raises(ValueError, match="another model configuration.*growth_rate"):
        train_and_evaluate(_experiment(tmp_path, steps=5, model=other))


def test_init_from_starts_a_fresh_run_from_another_runs_weights(tmp_path, caplog):
    source = write_model_dir(tmp_path / "source")
    # absl's own logger: its level is whatever an earlier test left, unless set here.
    caplog.set_level(logging.INFO, logger="absl")
    # A learning rate of ~0: what the run ends with is what it started from.
    result = train_and_evaluate(_experiment(tmp_path / "tuned", steps=10, lr=1e-12,
                                            init_from=str(tmp_path / "source")))
    assert result["step"] == 10  # its own step and schedule, not the source's
    assert "started from the weights of" in caplog.text
    weights, _, step = _restore_variables(tmp_path / "tuned", "ckpt-10")
    assert step == 10
    expected = {v.path: v.numpy() for v in source.trainable_variables}
    assert len(expected) > 10
    for name, value in weights:
        if name in expected:
            np.testing.assert_allclose(value, expected.pop(name), atol=1e-6, err_msg=name)
    assert not expected  # every trainable variable was compared


@pytest.mark.slow  # two trainings or more
def test_init_from_is_ignored_by_a_run_that_resumes(tmp_path, monkeypatch):
    write_model_dir(tmp_path / "source")
    config = _experiment(tmp_path / "tuned", steps=10, init_from=str(tmp_path / "source"),
                         stop_at_step=5)
    train_and_evaluate(config)
    monkeypatch.setattr(model_dir, "initialize_from", lambda *args: pytest.fail("re-initialised"))
    result = train_and_evaluate(dataclasses.replace(
        config, runtime=dataclasses.replace(config.runtime, stop_at_step=None)))
    assert result["step"] == 10


def test_trainable_classifiers_trains_the_exits_on_a_frozen_trunk(tmp_path):
    source = write_model_dir(tmp_path / "source")
    config = _experiment(tmp_path / "heads", steps=10, init_from=str(tmp_path / "source"))
    config = dataclasses.replace(config, optim=dataclasses.replace(config.optim,
                                                                   trainable="classifiers"))
    train_and_evaluate(config)
    weights, _, _ = _restore_variables(tmp_path / "heads", "ckpt-10")
    started = {v.path: v.numpy() for v in source.variables}
    changed = {name for name, value in weights if not np.allclose(value, started[name])}
    # Every exit's linear layer learned; nothing outside the classifiers moved, not even the
    # trunk's batch-norm statistics (frozen batch norm normalises with them).
    assert {f"exit{k}_logits/kernel" for k in (1, 2, 3)} <= changed
    assert all(name.startswith("exit") for name in changed), sorted(changed)
    assert any("moving_mean" in name for name, _ in weights)

    with pytest.raises(ValueError, match=r"trained with --trainable=classifiers, not "
                                         r"--trainable=all\. Resume with the same value"):
        train_and_evaluate(_experiment(tmp_path / "heads", steps=20))
    resumed = dataclasses.replace(config, optim=dataclasses.replace(config.optim, train_steps=20))
    assert train_and_evaluate(resumed)["step"] == 20
    _, slots, _ = _restore_variables(tmp_path / "heads", "ckpt-20")
    assert any(np.abs(value).sum() > 0 for name, value in slots if "exit1_logits" in name)


def test_init_from_errors_say_what_to_pass(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"--init_from=.*missing does not exist"):
        train_and_evaluate(_experiment(tmp_path / "run", init_from=str(tmp_path / "missing")))
    write_model_dir(tmp_path / "source", model_config=dataclasses.replace(TINY_RANET,
                                                                          growth_rate=6))
    with pytest.raises(ValueError, match=r"--init_from=.*source is another model "
                                         r"configuration.*growth_rate.*flags it was trained"):
        train_and_evaluate(_experiment(tmp_path / "run", init_from=str(tmp_path / "source")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="not a model directory written by ranet.train"):
        train_and_evaluate(_experiment(tmp_path / "run", init_from=str(tmp_path / "empty")))
    assert not (tmp_path / "run" / "checkpoints").exists()  # nothing half-written


def test_batch_must_divide_over_replicas(tmp_path):
    with pytest.raises(ValueError, match="multiple of 2"):
        train_and_evaluate(_experiment(tmp_path, batch_size=33, strategy="mirrored",
                                               num_cpu_devices=2))


@pytest.mark.slow  # two trainings or more
def test_small_ranet_beats_chance_on_real_cifar10(tmp_path, real_cifar10):
    data = config_lib.DataConfig(dataset="cifar10", data_dir=str(real_cifar10),
                                 validation_size=5000)
    result = train_and_evaluate(_experiment(
        tmp_path, steps=150, batch_size=128, lr=0.1, data=data,
        log_every_steps=50, checkpoint_every_steps=150))
    validation = result["validation"]
    assert validation["examples"] == 5000
    # Chance is 10%; 150 steps of the small preset reach ~40% on every exit.
    assert min(validation[f"accuracy/exit_{k}"] for k in (1, 2, 3)) > 0.25, validation


@pytest.mark.slow  # two trainings or more
def test_non_finite_loss_names_the_exact_step_and_saves_nothing_after_it(tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    train_and_evaluate(_experiment(first, steps=10, deterministic=True))
    shutil.copytree(first, second)
    # A learning rate of 1e6 diverges within a few steps of the resumed run. In `first` one
    # call runs steps 11-20, in `second` every step is its own call: both must name the
    # same step.
    failing_step = {}
    for directory, log_every in ((first, 100), (second, 1)):
        with pytest.raises(FloatingPointError, match=r"non-finite training loss at step (\d+)") \
                as error:
            train_and_evaluate(_experiment(directory, steps=40, lr=1e6, deterministic=True,
                                           log_every_steps=log_every))
        failing_step[log_every] = int(error.value.args[0].split("step ")[1].split(";")[0])
        assert "ckpt-10" in str(error.value)
        assert tf.train.latest_checkpoint(str(directory / "checkpoints")).endswith("ckpt-10")
    step = failing_step[100]
    assert 10 < step < 20 and failing_step[1] == step
    losses = _scalars(second)["loss/total"]
    assert all(np.isfinite(losses[s]) for s in range(11, step)), losses
    assert max(losses) == step - 1  # the failing step is neither logged nor saved


@pytest.mark.slow  # two trainings or more
def test_an_unreadable_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, caplog):
    train_and_evaluate(_experiment(tmp_path, steps=20))
    checkpoints = tmp_path / "checkpoints"
    # A machine crash can leave the newest checkpoint named but truncated.
    data = checkpoints / "ckpt-20.data-00000-of-00001"
    data.write_bytes(data.read_bytes()[:100])
    (checkpoints / "ckpt-30_temp").mkdir()  # litter of a save a SIGKILL interrupted
    caplog.set_level(logging.INFO, logger="absl")
    result = train_and_evaluate(_experiment(tmp_path, steps=30))
    assert result["step"] == 30
    assert "ckpt-20 cannot be restored" in caplog.text
    assert f"resumed from {checkpoints / 'ckpt-10'}" in caplog.text
    assert not (checkpoints / "ckpt-30_temp").exists()
    assert tf.train.latest_checkpoint(str(checkpoints)).endswith("ckpt-30")

    # Evaluation and export restore through the same fall-back.
    data = checkpoints / "ckpt-30.data-00000-of-00001"
    data.write_bytes(data.read_bytes()[:100])
    caplog.clear()
    _, _, path = model_dir.restore_model(str(tmp_path), "latest")
    assert path == str(checkpoints / "ckpt-20")
    assert "ckpt-30 cannot be restored" in caplog.text


def test_model_dir_is_required(tmp_path):
    with pytest.raises(ValueError, match="model_dir is required"):
        train_and_evaluate(_experiment(""))


@pytest.mark.slow  # two trainings or more
def test_training_in_the_serving_layout_is_the_same_training(tmp_path):
    """--training_layout=serving computes the same function with the same variables: the first
    steps match the sliced layout's, and its checkpoint loads into the ordinary model."""
    sliced, serving = tmp_path / "sliced", tmp_path / "serving"
    train_and_evaluate(_experiment(sliced, steps=10, deterministic=True))
    train_and_evaluate(_experiment(serving, steps=10, deterministic=True,
                                   training_layout="serving"))
    losses = _scalars(sliced)["loss/total"], _scalars(serving)["loss/total"]
    assert sorted(losses[0]) == sorted(losses[1]) == [5, 10]
    # Float sums in another order (depthwise pooling, no slices): close, not bitwise.
    np.testing.assert_allclose(losses[1][5], losses[0][5], rtol=1e-2)
    _, restored, _ = model_dir.restore_model(str(serving), "latest")
    from ranet.models import serving_layout
    with serving_layout():
        trained_layout = get_model(TINY_RANET)
    values = {v.path: v for v in restored.variables}
    for variable in trained_layout.variables:
        variable.assign(values[variable.path])
    images = np.random.default_rng(0).normal(size=(4, 32, 32, 3)).astype(np.float32)
    for ours, theirs in zip(restored(images, training=False),
                            trained_layout(images, training=False)):
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5)

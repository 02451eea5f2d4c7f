"""ranet.config: validation, one message for a bad choice, durations in steps, JSON round trip."""

import dataclasses
import json

import pytest

from helpers import SMOKE
from ranet import config as config_lib
from ranet.config import DataConfig, ModelConfig, OptimConfig, RuntimeConfig


def test_round_trip_through_config_json(tmp_path):
    config_lib.save(SMOKE, str(tmp_path))
    assert config_lib.load(str(tmp_path)) == SMOKE
    # Infinities or NaNs never reach the file: it is strict JSON.
    json.loads((tmp_path / "config.json").read_text())


def test_a_missing_config_says_what_the_folder_is_not(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a model directory written by ranet.train"):
        config_lib.load(str(tmp_path))


@pytest.mark.parametrize("build, message", [
    (lambda: DataConfig(dataset="mnist"), r"dataset must be one of cifar10, cifar100, imagenet, "
                                          r"synthetic"
                                          r"\. Received: dataset='mnist'"),
    (lambda: RuntimeConfig(strategy="ps"), r"strategy must be one of default, .*'ps'"),
    (lambda: RuntimeConfig(precision="fp16"), r"precision must be one of fp32, .*'fp16'"),
    (lambda: OptimConfig(schedule="step"), r"schedule must be one of multistep, cosine"),
    (lambda: ModelConfig(name="vit"), r"model must be one of ranet, msdnet, vgg16, resnet50"),
    (lambda: OptimConfig(time_budget="12 minutes"), r"time_budget takes a duration such as "
                                                    r"90s, 12m, 8h or 1h30m"),
    (lambda: OptimConfig(time_budget="1h", train_steps=10), r"--time_budget and --train_steps"),
    (lambda: OptimConfig(distillation_weight=1.5), r"distillation_weight must be in \[0, 1\]"),
    (lambda: OptimConfig(trainable="heads"), r"trainable must be one of all, classifiers\. "
                                             r"Received: trainable='heads'"),
    (lambda: OptimConfig(decay_fractions=(0.5, 1.0)), r"decay_fractions must lie in \(0, 1\)"),
    (lambda: RuntimeConfig(stop_at_step=0), r"stop_at_step must be positive"),
    (lambda: RuntimeConfig(model_dir="runs/a", init_from="runs/./a"), r"init_from=runs/\./a is "
                                                                      r"--model_dir itself"),
    (lambda: RuntimeConfig(init_from=" "), r"init_from must name a model directory"),
    (lambda: RuntimeConfig(training_layout="fused"), r"training_layout must be one of sliced, "
                                                     r"serving\. Received: training_layout='fused'"),
    (lambda: RuntimeConfig(intra_op_threads=-1), r"intra_op_threads must be >= 0"),
    (lambda: DataConfig(crop_padding=-1), r"crop_padding must be >= 0 \(0: flips only\)"),
    (lambda: DataConfig(dataset="imagenet", crop_padding=0), r"Leave --crop_padding at 4 for "
                                                             r"--dataset=imagenet"),
    (lambda: DataConfig(dataset="synthetic", test_size=10), r"synthetic has its own\. "
                                                            r"Received: test_size=10"),
    (lambda: DataConfig(normalization_mean=(0.5, 0.5, 0.5)), r"go together: pass both"),
    (lambda: DataConfig(normalization_mean=(0.5,), normalization_std=(0.2,)), r"3 values each"),
    (lambda: DataConfig(normalization_mean=(0.5,) * 3, normalization_std=(0.2, 0.0, 0.2)),
     r"the std positive"),
    (lambda: dataclasses.replace(SMOKE, model=dataclasses.replace(SMOKE.model, num_classes=100)),
     r"model.num_classes \(100\) does not match dataset synthetic \(10 classes\)"),
])
def test_invalid_values_are_refused_with_the_value_received(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_dtype_policy_of_each_precision():
    assert [config_lib.dtype_policy(p) for p in config_lib.PRECISIONS] == [
        "float32", "mixed_float16", "mixed_bfloat16"]


def test_epoch_plan_decays_at_epoch_boundaries():
    optim = OptimConfig(epochs=10, decay_fractions=(0.5, 0.75))
    plan = config_lib.plan_steps(optim, RuntimeConfig(eval_every_epochs=2), steps_per_epoch=7)
    # round(0.75 * 10) = 8 epochs (the reference's per-epoch schedule), not 0.75 * 70 steps.
    assert plan == config_lib.StepPlan(steps_per_epoch=7, total_steps=70, warmup_steps=0,
                                       decay_steps=(35, 56), eval_every_steps=14)


def test_step_plan_decays_at_fractions_of_the_steps_and_caps_the_warm_up():
    optim = OptimConfig(train_steps=30, schedule="cosine", warmup_epochs=100.0)
    plan = config_lib.plan_steps(optim, RuntimeConfig(), steps_per_epoch=7)
    assert (plan.total_steps, plan.decay_steps) == (30, (15, 22))
    assert plan.warmup_steps == 29  # at most every step but the last


@pytest.mark.parametrize("text, seconds", [("90s", 90), ("12m", 720), ("8h", 28800),
                                           ("1h30m", 5400), ("2d", 172800)])
def test_durations(text, seconds):
    assert config_lib.parse_duration(text, "time_budget") == seconds
    assert OptimConfig(time_budget=text).time_budget_seconds == seconds


def test_a_budgeted_run_decays_at_fractions_of_its_planned_steps():
    optim = OptimConfig(time_budget="1h", decay_fractions=(0.5, 0.75), warmup_epochs=0.5)
    unplanned = config_lib.plan_steps(optim, RuntimeConfig(), steps_per_epoch=10)
    assert unplanned.total_steps == config_lib.UNPLANNED_STEPS and unplanned.warmup_steps == 5
    planned = config_lib.plan_steps(optim, RuntimeConfig(), steps_per_epoch=10, total_steps=400)
    assert (planned.total_steps, planned.decay_steps) == (400, (200, 300))


def test_with_data_dir_changes_only_the_folder():
    data = DataConfig(dataset="cifar10", data_dir="/a")
    assert data.with_data_dir(None) is data
    assert data.with_data_dir("/b") == dataclasses.replace(data, data_dir="/b")


def test_a_config_json_from_before_pytorch_padding_keeps_keras_same_padding(tmp_path):
    config_lib.save(SMOKE, str(tmp_path))
    raw = json.loads((tmp_path / "config.json").read_text())
    assert raw["model"].pop("conv_padding") == "pytorch"
    (tmp_path / "config.json").write_text(json.dumps(raw))
    assert config_lib.load(str(tmp_path)).model.conv_padding == "same"

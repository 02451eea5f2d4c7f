"""The train binary as a user runs it: presets, and clean failures on bad input."""

import os
import subprocess
import sys

import pytest

from conftest import REPO_ROOT


def _train(*args, timeout=240):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    return subprocess.run([sys.executable, "-m", "ranet.train", *args], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_smoke_preset_trains_and_leaves_checkpoints(tmp_path):
    run = _train("--flagfile=flags/ranet_smoke.cfg", f"--model_dir={tmp_path}")
    assert run.returncode == 0, run.stderr[-3000:]
    assert (tmp_path / "checkpoints" / "ckpt-20.index").exists()
    assert "--flagfile" not in (tmp_path / "flags.txt").read_text()
    assert "--scale_list=1-2" in (tmp_path / "flags.txt").read_text()
    assert "step 20/20" in run.stderr


@pytest.mark.parametrize("args, message", [
    (["--model=foo"], "value should be one of <ranet|vgg16|resnet50>"),
    (["--train_steps=-3"], "train_steps must be >= 0"),
    (["--scale_list=1-x"], "--scale_list takes integers"),
    (["--scale_list=2-3"], "scale_list must start at 1"),
    (["--strategy=mirrored", "--num_cpu_devices=2", "--batch_size=33"], "multiple of 2"),
    (["--dataset=cifar10", "--data_dir=/nonexistent/cifar"], "--data_dir"),
    (["--model_dir="], "model_dir is required"),
])
def test_bad_input_fails_with_a_message_that_says_how_to_fix_it(tmp_path, args, message):
    run = _train("--flagfile=flags/ranet_smoke.cfg", f"--model_dir={tmp_path}", *args)
    assert run.returncode != 0
    assert message in run.stderr, run.stderr[-2000:]
    assert "Traceback" not in run.stderr
    assert not (tmp_path / "checkpoints").exists()


def _preset(name: str):
    from absl import flags

    from ranet import cli
    values = flags.FlagValues()
    cli.define_flags(values)
    values(["train", f"--flagfile={os.path.join(REPO_ROOT, 'flags', name)}"])
    return cli.experiment_config(values)


@pytest.mark.parametrize("name", sorted(os.listdir(os.path.join(REPO_ROOT, "flags"))))
def test_every_preset_parses_into_a_valid_config(name):
    config = _preset(name)
    assert config.runtime.model_dir.startswith("runs/")
    assert config.optim.batch_size > 0


def test_gpu_short_preset_is_the_cifar_network_on_a_shorter_mixed_precision_schedule():
    full, short = _preset("ranet_cifar10.cfg"), _preset("ranet_cifar10_gpu_short.cfg")
    assert short.model == full.model
    assert short.optim.epochs == 15 < full.optim.epochs
    assert (short.runtime.precision, short.runtime.xla) == ("mixed_float16", True)

"""Tests for the ``python -m ranet.summary`` binary, run as a user runs it: in a subprocess."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FLAGFILE = REPO / "flags" / "ranet_cifar10.cfg"

SCRIPT_FLAGS = ("--scale_list=1-2-3-3", "--growth_factors=4-2-1-1", "--bottleneck_factors=4-2-1-1")
TINY_FLAGS = ("--scale_list=1-2", "--growth_factors=2-1", "--bottleneck_factors=2-1",
              "--base_channels=8", "--growth_rate=4", "--num_blocks=1", "--block_step=1",
              "--step=2")
# Per-exit cumulative multiply-adds of the reference PyTorch implementation (see test_costs.py).
SCRIPT_CIFAR10 = {
    "model": "ranet", "params": 3261830,
    "exits": [{"exit": k, "macs": macs} for k, macs in enumerate(
        [15814410, 31283220, 44655390, 50358312, 60654578, 63647996, 90173958, 94904592],
        start=1)]}


def _summary(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    return subprocess.run([sys.executable, "-m", "ranet.summary", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def _json(result: subprocess.CompletedProcess) -> dict:
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)  # the whole of stdout: nothing else may be printed there


def test_json_of_the_reference_script_config():
    assert _json(_summary(*SCRIPT_FLAGS, "--json")) == SCRIPT_CIFAR10


@pytest.mark.skipif(not FLAGFILE.exists(), reason=f"{FLAGFILE.relative_to(REPO)} does not exist yet")
def test_flagfile_gives_the_script_numbers():
    assert _json(_summary(f"--flagfile={FLAGFILE.relative_to(REPO)}", "--json")) == SCRIPT_CIFAR10


def test_table_matches_the_library():
    from ranet import costs
    from ranet.config import ModelConfig
    from ranet.models import get_model

    result = _summary(*TINY_FLAGS)
    assert result.returncode == 0, result.stderr
    config = ModelConfig(scale_list=(1, 2), growth_factors=(2, 1), bottleneck_factors=(2, 1),
                         base_channels=8, growth_rate=4, num_blocks=1, block_step=1, step=2)
    cost = costs.count(get_model(config))
    assert result.stdout.strip() == costs.format_table(cost)
    lines = result.stdout.strip().splitlines()
    assert lines[0].startswith(f"ranet: {cost.params:,} parameters")
    assert [line.split()[0] for line in lines[2:]] == ["1", "2"]


def test_unknown_model_names_the_allowed_values():
    result = _summary("--model=foo")
    assert result.returncode != 0
    assert "--model" in result.stderr
    for name in ("ranet", "vgg16", "resnet50"):
        assert name in result.stderr
    assert result.stdout == ""


def test_bad_scale_list_names_the_flag():
    result = _summary("--scale_list=a-b", "--json")
    assert result.returncode != 0
    assert "--scale_list" in result.stderr and "a-b" in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""


def test_invalid_config_fails_cleanly():
    result = _summary("--scale_list=2-3", "--growth_factors=2-1", "--bottleneck_factors=2-1")
    assert result.returncode != 0
    assert "scale_list must start at 1" in result.stderr
    assert "Traceback" not in result.stderr


def test_stray_arguments_are_rejected():
    result = _summary("--json", "extra")
    assert result.returncode != 0
    assert "unexpected arguments: extra" in result.stderr

"""Full-size reference checkpoints against their logits (slow; the files live outside the repo).

The checkpoints of the reference's CIFAR presets are 10-14 MB each, so they are not
committed. ``tests/fixtures/reference/HOW_MADE.md`` says how to make them with the reference
code; point ``RANET_REFERENCE_PRESETS`` at the folder holding ``<name>/checkpoint.pth.tar``,
``images.npz``, ``logits.npz`` and ``fixture_info.json``. Without it these tests skip.
"""

import json
import os
from pathlib import Path

import numpy as np
import pytest

from ranet import data
from ranet.reference import importing, torch_file

# The reference's argument names (args.py) and the flags here that mean the same.
REFERENCE_TO_RANET = {
    "--data": "--dataset", "--scale-list": "--scale_list", "--grFactor": "--growth_factors",
    "--bnFactor": "--bottleneck_factors", "--nChannels": "--base_channels",
    "--growthRate": "--growth_rate", "--nBlocks": "--num_blocks", "--block-step": "--block_step",
    "--step": "--step", "--stepmode": "--step_mode", "--compress-factor": "--compress_factor",
    "--reduction": "--reduction",
}


def ranet_flags(reference_flags):
    pairs = zip(reference_flags[::2], reference_flags[1::2])
    return ["--model=ranet",
            *(f"{REFERENCE_TO_RANET[name]}={value}" for name, value in pairs)]


def _presets():
    folder = os.environ.get("RANET_REFERENCE_PRESETS")
    if not folder:
        return [pytest.param(None, marks=pytest.mark.skip(
            reason="RANET_REFERENCE_PRESETS is not set (HOW_MADE.md makes the checkpoints)"))]
    return sorted(path for path in Path(folder).iterdir() if (path / "checkpoint.pth.tar").is_file())


def max_logit_errors(preset: Path, model_dir: Path):
    """(max |delta logit| per exit, max |delta| / (1 + |logit|) per exit) after importing."""
    from tests.reference.test_importing import config_from_flags
    info = json.loads((preset / "fixture_info.json").read_text())
    config = importing.with_reference_normalization(
        config_from_flags(model_dir, ranet_flags(info["flags"])))
    state_dict = importing.state_dict_of(torch_file.read(str(preset / "checkpoint.pth.tar")),
                                         str(preset))
    model = importing.build_imported_model(config, state_dict)
    images = np.load(preset / "images.npz")["images"]
    reference = np.load(preset / "logits.npz")
    outputs = model(data.normalize(images, config.data.normalization_mean,
                                   config.data.normalization_std), training=False)
    assert len(outputs) == len(reference.files)
    absolute, relative = [], []
    for k, logits in enumerate(outputs, start=1):
        expected = reference[f"exit_{k}"]
        error = np.abs(np.asarray(logits) - expected)
        absolute.append(float(error.max()))
        relative.append(float((error / (1 + np.abs(expected))).max()))
    return absolute, relative


@pytest.mark.slow
@pytest.mark.parametrize("preset", _presets(), ids=lambda p: getattr(p, "name", "none"))
def test_reference_preset_logits_match(preset, tmp_path):
    absolute, relative = max_logit_errors(preset, tmp_path / "model")
    print(f"{preset.name}: max |delta logit| per exit {['%.2e' % e for e in absolute]}")
    assert max(relative) <= 1e-4, relative

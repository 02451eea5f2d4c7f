"""Importing MSDNet-PyTorch checkpoints: the mapping and the logits its own code produced
(tests/fixtures/msdnet, made as its HOW_MADE.md says)."""

import json
import lzma
import os

import numpy as np
import pytest

from ranet import data, models
from ranet.data import imagenet
from ranet.reference import importing, mapping, torch_file
from ranet.training import model_dir as model_dir_lib
from tests.helpers import REPO_ROOT
from tests.reference.test_importing import assert_exits_match, config_from_flags
from tests.test_costs import msdnet_flags

FIXTURES = REPO_ROOT / "tests" / "fixtures" / "msdnet"


def _fixture(name: str, tmp_path):
    """(the fixture's folder, its checkpoint decompressed, the flags here for it)."""
    folder = FIXTURES / name
    path = tmp_path / f"{name}.pth.tar"
    path.write_bytes(lzma.decompress((folder / "checkpoint.pth.tar.xz").read_bytes()))
    info = json.loads((folder / "fixture_info.json").read_text())
    return folder, str(path), msdnet_flags(info["flags"])


def _assert_logits_match(model, inputs, folder) -> None:
    assert_exits_match(model(inputs, training=False), folder / "logits.npz", model.num_exits)


def test_imported_model_directory_reproduces_the_reference_logits(tmp_path):
    folder, checkpoint, flags = _fixture("tiny", tmp_path)
    directory = tmp_path / "imported"
    saved = importing.import_checkpoint(checkpoint, config_from_flags(directory, flags))
    assert sorted(os.listdir(directory)) == ["checkpoints", "config.json"]
    config, model, path = model_dir_lib.restore_model(str(directory))
    assert path == saved and config.model.name == "msdnet" and model.num_exits == 3
    assert config.data.normalization_mean == (0.4914, 0.4824, 0.4467)
    images = np.load(folder / "images.npz")["images"]
    _assert_logits_match(model, data.normalize(images, config.data.normalization_mean,
                                               config.data.normalization_std), folder)


def test_imagenet_layout_reproduces_the_reference_logits(tmp_path):
    """The biased 7x7/2 stem, the max-pool and heads as wide as their input, 4 scales."""
    folder, checkpoint, flags = _fixture("tiny_imagenet", tmp_path)
    config = importing.with_reference_normalization(config_from_flags(tmp_path / "in", flags))
    assert config.data.normalization_mean == imagenet.MEAN
    state_dict = importing.state_dict_of(torch_file.read(checkpoint), checkpoint)
    model = importing.build_imported_model(config, state_dict)
    small = np.load(folder / "images.npz")["images"]
    images = np.repeat(np.repeat(small, 7, axis=1), 7, axis=2)  # as the fixture was made
    _assert_logits_match(model, data.normalize(images, imagenet.MEAN, imagenet.STD), folder)


def test_every_reference_tensor_is_used_once_and_every_variable_filled(tmp_path):
    _, checkpoint, flags = _fixture("tiny", tmp_path)
    state_dict = mapping.strip_data_parallel(
        importing.state_dict_of(torch_file.read(checkpoint), checkpoint))
    config = config_from_flags(tmp_path / "unused", flags).model
    model = models.get_model(config)
    pairs = mapping.assignments(model, state_dict, config)
    assert len(pairs) == len(model.variables)
    used = {mapping.reference_source(v.path, config).key for v, _ in pairs}
    ignored = {key for key in state_dict if key.endswith(mapping.IGNORED_SUFFIXES)}
    unread = set(mapping.unread_keys(state_dict, config))
    assert used | ignored | unread == set(state_dict) and not used & (ignored | unread)


def test_names_follow_the_reference_modules(tmp_path):
    """Block 2 of the tiny model drops the finest scale, so its first branch is scale 1 and
    is the reference's layers.0; the transition after it is blocks.1.1; block 3 starts at
    scale 1."""
    config = config_from_flags(tmp_path / "names", msdnet_flags([
        "--nBlocks", "3", "--step", "1", "--base", "2", "--nChannels", "8",
        "--growthRate", "4"])).model
    source = lambda path: mapping.reference_source(path, config).key  # noqa: E731
    assert source("block1_layer0_scale2_conv/kernel") == "blocks.0.0.layers.2.net.0.weight"
    assert (source("block2_layer0_scale1_down_1x1_conv/kernel")
            == "blocks.1.0.layers.0.conv_down.net.0.weight")
    assert (source("block2_layer1_scale2_transition_bn/gamma")
            == "blocks.1.1.m.1.net.1.weight")
    assert (source("block3_layer0_scale2_normal_3x3_bn/moving_mean")
            == "blocks.2.0.layers.1.conv_normal.net.4.running_mean")
    assert source("exit3_logits/kernel") == "classifier.2.linear.weight"
    with pytest.raises(KeyError):
        source("block3_layer0_scale0_normal_3x3_conv/kernel")  # scale 0 is dropped there


def test_wrong_architecture_flags_name_the_shapes_and_write_no_directory(tmp_path):
    _, checkpoint, flags = _fixture("tiny", tmp_path)
    directory = tmp_path / "wrong"
    with pytest.raises(mapping.MappingError) as raised:
        importing.import_checkpoint(checkpoint,
                                    config_from_flags(directory, flags + ["--bottleneck=false"]))
    assert "are the architecture flags" in str(raised.value)
    assert not directory.exists() and not (tmp_path / "wrong.importing").exists()


def test_branches_no_exit_reads_are_left_out_and_their_tensors_skipped(tmp_path):
    """The tiny model's last layer keeps scales 1 and 2, and exit 3 reads scale 2 only: the
    reference computes the scale-1 branch anyway, the port does not. The parameters here are
    the reference's less exactly that branch's."""
    folder, checkpoint, flags = _fixture("tiny", tmp_path)
    config = config_from_flags(tmp_path / "unread", flags).model
    assert models.msdnet.unread_branches(config) == [(3, 0, 1)]
    state_dict = mapping.strip_data_parallel(
        importing.state_dict_of(torch_file.read(checkpoint), checkpoint))
    unread = mapping.unread_keys(state_dict, config)
    assert unread and all(key.startswith("blocks.2.0.layers.0.conv_normal.") for key in unread)
    trainable = [key for key in unread if key.endswith(("weight", "bias"))]
    from ranet import costs
    reference_params = json.loads((folder / "fixture_info.json").read_text())["parameters"]
    assert costs.count(models.get_model(config)).params == reference_params - sum(
        state_dict[key].size for key in trainable)

"""Importing the reference's checkpoints: the mapping, the logits, the model directory."""

import json
import os

import numpy as np
import pytest

from ranet import config as config_lib
from ranet import data
from ranet.reference import importing, mapping, torch_file
from ranet.training import model_dir as model_dir_lib
from tests.reference.test_torch_file import TINY, unpacked

# The tiny reference configuration of tests/fixtures/reference/tiny (fixture_info.json).
TINY_FLAGS = ["--model=ranet", "--dataset=cifar10", "--scale_list=1-2-3",
              "--growth_factors=4-2-1", "--bottleneck_factors=4-2-1", "--base_channels=8",
              "--growth_rate=4", "--num_blocks=1", "--block_step=1", "--step=2",
              "--step_mode=even", "--compress_factor=0.25", "--reduction=0.5"]


def config_from_flags(model_dir, flag_list) -> config_lib.ExperimentConfig:
    from absl import flags
    from ranet import cli
    values = flags.FlagValues()
    cli.define_config_flags(values)
    values(["import", *flag_list, f"--model_dir={model_dir}"])
    return cli.experiment_config(values)


def tiny_config(model_dir, *extra) -> config_lib.ExperimentConfig:
    return config_from_flags(model_dir, [*TINY_FLAGS, *extra])


def reference_state_dict(tmp_path):
    return torch_file.read(unpacked(tmp_path, "checkpoint.pth.tar"))["state_dict"]


def assert_logits_match_the_reference(model, config):
    """Every exit within 1e-4 (1 + |logit|) of the reference's float32 logits."""
    fixture = np.load(TINY / "images.npz")
    inputs = data.normalize(fixture["images"], config.data.normalization_mean,
                            config.data.normalization_std)
    assert_exits_match(model(inputs, training=False), TINY / "logits.npz", num_exits=3)


def assert_exits_match(outputs, logits_file, num_exits: int, same_classes: bool = True):
    """Each exit's logits within 1e-4 (1 + |logit|) of the reference's (``exit_<k>`` in
    ``logits_file``) and, with ``same_classes``, the same class for every image."""
    reference = np.load(logits_file)
    assert len(outputs) == len(reference.files) == num_exits
    for k, logits in enumerate(outputs, start=1):
        expected = reference[f"exit_{k}"]
        error = np.abs(np.asarray(logits) - expected)
        assert np.all(error <= 1e-4 * (1 + np.abs(expected))), (k, error.max())
        if same_classes:
            np.testing.assert_array_equal(np.argmax(logits, 1), expected.argmax(1))


def test_imported_model_directory_reproduces_the_reference_logits(tmp_path):
    directory = tmp_path / "imported"
    saved = importing.import_checkpoint(unpacked(tmp_path, "checkpoint.pth.tar"),
                                        tiny_config(directory))
    assert saved == str(directory / "checkpoints" / "ckpt-0")
    assert sorted(os.listdir(directory)) == ["checkpoints", "config.json"]
    config, model, path = model_dir_lib.restore_model(str(directory))
    assert path == saved
    # Normalised with the reference's constants, not statistics of the train split.
    assert config.data.normalization_mean == (0.4914, 0.4824, 0.4467)
    assert config.data.normalization_std == (0.2471, 0.2435, 0.2616)
    assert config.model.conv_padding == "pytorch"
    assert_logits_match_the_reference(model, config)


def test_legacy_checkpoint_imports_to_the_same_function(tmp_path):
    config = importing.with_reference_normalization(tiny_config(tmp_path / "legacy"))
    state_dict = importing.state_dict_of(
        torch_file.read(unpacked(tmp_path, "legacy_checkpoint.pth.tar")), "legacy")
    assert_logits_match_the_reference(importing.build_imported_model(config, state_dict), config)


def test_a_bare_state_dict_without_the_dataparallel_prefix_imports_too(tmp_path):
    config = importing.with_reference_normalization(tiny_config(tmp_path / "bare"))
    state_dict = {key[len("module."):]: value
                  for key, value in reference_state_dict(tmp_path).items()}
    assert_logits_match_the_reference(importing.build_imported_model(config, state_dict), config)


def test_every_reference_tensor_is_used_once_and_every_variable_filled(tmp_path):
    state_dict = mapping.strip_data_parallel(reference_state_dict(tmp_path))
    config = tiny_config(tmp_path / "unused")
    from ranet import models
    model = models.get_model(config.model)
    pairs = mapping.assignments(model, state_dict, config.model)
    assert len(pairs) == len(model.variables)
    used = {mapping.reference_source(v.path, config.model).key for v, _ in pairs}
    ignored = {key for key in state_dict if key.endswith(mapping.IGNORED_SUFFIXES)}
    assert used | ignored == set(state_dict) and not used & ignored
    assert len(ignored) == sum(key.endswith("running_mean") for key in state_dict)


def test_layouts_are_converted_not_copied(tmp_path):
    state_dict = mapping.strip_data_parallel(reference_state_dict(tmp_path))
    config = importing.with_reference_normalization(tiny_config(tmp_path / "layouts"))
    model = importing.build_imported_model(config, state_dict)
    variables = {v.path: v for v in model.variables}
    oihw = state_dict["classifier.0.m.0.net.0.weight"]  # exit 1's first 3x3 convolution
    np.testing.assert_array_equal(variables["exit1_conv1_conv/kernel"].numpy(),
                                  oihw.transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(variables["exit2_logits/kernel"].numpy(),
                                  state_dict["classifier.1.linear.weight"].T)
    # The stem builds the highest resolution (the last flow) first.
    np.testing.assert_array_equal(variables["stem2_bn/moving_variance"].numpy(),
                                  state_dict["FirstLayer.layers.0.net.1.running_var"])


def test_a_mismatch_lists_every_problem_and_writes_nothing(tmp_path):
    state_dict = dict(reference_state_dict(tmp_path))
    del state_dict["module.classifier.2.linear.bias"]
    state_dict["module.classifier.3.linear.weight"] = np.zeros((10, 128), np.float32)
    directory = tmp_path / "mismatch"
    config = importing.with_reference_normalization(tiny_config(directory))
    with pytest.raises(mapping.MappingError) as raised:
        importing.build_imported_model(config, state_dict)
    message = str(raised.value)
    assert "2 problems" in message
    assert "exit3_logits/bias needs classifier.2.linear.bias, which the checkpoint lacks" in message
    assert "classifier.3.linear.weight (10, 128) is not used by any variable" in message


def test_wrong_architecture_flags_name_the_shapes_and_write_no_directory(tmp_path):
    checkpoint = unpacked(tmp_path, "checkpoint.pth.tar")
    directory = tmp_path / "wrong"
    with pytest.raises(mapping.MappingError) as raised:
        importing.import_checkpoint(checkpoint, tiny_config(directory, "--growth_rate=8"))
    assert "has shape" in str(raised.value) and "are the architecture flags" in str(raised.value)
    assert not directory.exists() and not (tmp_path / "wrong.importing").exists()


def test_refuses_to_write_into_a_model_directory_that_has_files(tmp_path):
    directory = tmp_path / "taken"
    directory.mkdir()
    (directory / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="exists and is not empty"):
        importing.import_checkpoint(unpacked(tmp_path, "checkpoint.pth.tar"),
                                    tiny_config(directory))
    assert json.loads((directory / "config.json").read_text()) == {}


def test_import_binary_writes_a_directory_the_eval_binary_reads(tmp_path):
    from ranet import cli, import_reference
    directory = tmp_path / "cli"
    cli.call(import_reference.main, import_reference.define_flags,
             [f"--checkpoint={unpacked(tmp_path, 'checkpoint.pth.tar')}", *TINY_FLAGS,
              f"--model_dir={directory}"])
    config, model, _ = model_dir_lib.restore_model(str(directory))
    assert_logits_match_the_reference(model, config)
    with pytest.raises(ValueError, match="--checkpoint is required"):
        cli.call(import_reference.main, import_reference.define_flags,
                 [*TINY_FLAGS, f"--model_dir={tmp_path / 'none'}"])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        cli.call(import_reference.main, import_reference.define_flags,
                 [f"--checkpoint={tmp_path / 'absent.pth'}", *TINY_FLAGS,
                  f"--model_dir={tmp_path / 'none'}"])


def test_only_ranet_imports(tmp_path):
    config = tiny_config(tmp_path / "vgg", "--model=vgg16")
    with pytest.raises(ValueError, match="checkpoints of ranet, msdnet can be imported.*--model=vgg16"):
        importing.build_imported_model(config, reference_state_dict(tmp_path))


def test_imagenet_configuration_reproduces_the_reference_logits(tmp_path):
    """The reference's ImageNet layout: a biased 7x7/2 stem conv, a 3x3/2 max-pool, and exit
    heads as wide as their input, on 224x224 images (tests/fixtures/reference/tiny_imagenet)."""
    import lzma
    from ranet import models
    from ranet.data import imagenet
    fixture = TINY.parent / "tiny_imagenet"
    path = tmp_path / "imagenet.pth"
    path.write_bytes(lzma.decompress((fixture / "checkpoint.pth.tar.xz").read_bytes()))
    model_config = config_lib.ModelConfig(
        imagenet=True, image_size=224, num_classes=1000, scale_list=(1, 2, 3, 4),
        growth_factors=(4, 2, 1, 1), bottleneck_factors=(4, 2, 1, 1), base_channels=4,
        growth_rate=4, num_blocks=1, block_step=1, step=2)
    model = models.get_model(model_config)
    state_dict = importing.state_dict_of(torch_file.read(str(path)), str(path))
    for variable, value in mapping.assignments(model, state_dict, model_config):
        variable.assign(value)
    small = np.load(fixture / "images_32.npz")["images"]
    images = np.repeat(np.repeat(small, 7, axis=1), 7, axis=2)  # as the fixture was made
    outputs = model(data.normalize(images, imagenet.MEAN, imagenet.STD), training=False)
    assert_exits_match(outputs, fixture / "logits.npz", num_exits=4, same_classes=False)

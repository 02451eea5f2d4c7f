"""ranet.models: one contract over every registered model, plus RANet specifics."""

import collections
import dataclasses
import re

import keras
import numpy as np
import pytest

from helpers import TINY_MSDNET, TINY_RANET
from ranet import config as config_lib
from ranet import models
from ranet.config import ModelConfig
from ranet.models import MODEL_NAMES, ExitInfo, StagedClassifier, get_model
from ranet.models.ranet import layers_in_block
from ranet.models.staged import IMAGES, LOGITS

BATCH = 3
NUM_CLASSES = 7  # not 10, so that a hard-coded class count shows up

# The reference's CIFAR training script (yangle15/RANet-pytorch, train_cifar.sh).
SCRIPT_RANET = dict(scale_list=(1, 2, 3, 3), growth_factors=(4, 2, 1, 1),
                    bottleneck_factors=(4, 2, 1, 1))

# One small configuration per registered model, with the exits it must have. A model added
# to the registry without an entry here fails test_every_registered_model_has_a_contract_config.
CONTRACT_CONFIGS = {
    "ranet": (dataclasses.replace(TINY_RANET, num_classes=NUM_CLASSES), 3),
    "msdnet": (dataclasses.replace(TINY_MSDNET, num_classes=NUM_CLASSES), 3),
    "vgg16": (ModelConfig(name="vgg16", num_classes=NUM_CLASSES), 1),
    "resnet50": (ModelConfig(name="resnet50", num_classes=NUM_CLASSES), 1),
    "mobilenet_v2": (ModelConfig(name="mobilenet_v2", num_classes=NUM_CLASSES), 1),
}


def _images(batch: int = BATCH, size: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(batch, size, size, 3)).astype("float32")


def _dtype(tensor) -> str:
    return keras.backend.standardize_dtype(tensor.dtype)


# ---------------------------------------------------------------------------------------------
# The contract, over every registered model.

def test_every_registered_model_has_a_contract_config():
    assert set(CONTRACT_CONFIGS) == set(MODEL_NAMES)


def test_registry_and_config_agree_on_the_model_names():
    # --model's allowed values come from config.MODELS; get_model from the registry.
    assert tuple(config_lib.MODELS) == tuple(MODEL_NAMES)


@pytest.fixture(scope="module", params=MODEL_NAMES)
def contract_case(request):
    """(name, model, expected exits, outputs on _images()): each model built once per module."""
    keras.mixed_precision.set_global_policy("float32")
    config, num_exits = CONTRACT_CONFIGS[request.param]
    model = get_model(config)
    images = _images()
    outputs = model(images, training=False)
    return request.param, model, num_exits, images, outputs


def test_contract_exits(contract_case):
    name, model, num_exits, _, _ = contract_case
    assert isinstance(model, StagedClassifier)
    assert model.num_exits == num_exits
    assert len(model.stages) == len(model.exits) == len(model.stage_inputs) == num_exits
    assert len(model.live_after) == num_exits
    for k, info in enumerate(model.exits, start=1):
        assert isinstance(info, ExitInfo)
        assert info.index == k
        assert info.resolution > 0 and info.channels > 0


def test_contract_logits_shape_and_dtype(contract_case):
    _, model, num_exits, _, outputs = contract_case
    assert isinstance(outputs, list) and len(outputs) == num_exits
    for logits in outputs:
        assert tuple(logits.shape) == (BATCH, NUM_CLASSES)
        assert _dtype(logits) == "float32"
        assert np.all(np.isfinite(np.asarray(logits)))


def test_contract_stages_one_by_one_reproduce_the_call(contract_case):
    _, model, num_exits, images, outputs = contract_case
    features = {IMAGES: images}
    for k in range(num_exits):
        logits, new_features = model.run_stage(k, features, training=False)
        assert LOGITS not in new_features
        np.testing.assert_array_equal(np.asarray(logits), np.asarray(outputs[k]))
        features.update(new_features)


def test_contract_stages_on_only_the_live_features_reproduce_the_call(contract_case):
    """Early exit keeps only live_after[k] between stages: that must be enough."""
    _, model, num_exits, images, outputs = contract_case
    features = {IMAGES: images}
    for k in range(num_exits):
        logits, new_features = model.run_stage(k, features, training=False)
        np.testing.assert_array_equal(np.asarray(logits), np.asarray(outputs[k]))
        features.update(new_features)
        features = {name: features[name] for name in model.live_after[k]}


def test_contract_stage_inputs_are_available_and_nothing_lives_after_the_last(contract_case):
    _, model, num_exits, _, _ = contract_case
    assert model.live_after[-1] == ()
    available = {IMAGES}
    for k, stage in enumerate(model.stages):
        missing = set(model.stage_inputs[k]) - available
        assert not missing, f"stage {k} reads {sorted(missing)}, which no earlier stage produced"
        produced = set(stage.output.keys()) - {LOGITS}
        assert LOGITS in stage.output
        available |= produced
        read_later = set().union(*map(set, model.stage_inputs[k + 1:]))
        # Every live feature is read later, and every feature read later is live or made later.
        assert set(model.live_after[k]) <= read_later
        assert set(model.live_after[k]) <= available
        assert read_later & available <= set(model.live_after[k])


def test_baseline_exit_describes_the_flattened_features():
    vgg16 = get_model(ModelConfig(name="vgg16"))
    assert vgg16.exits == (ExitInfo(index=1, resolution=1, channels=512),)
    assert vgg16.stage_inputs == [(IMAGES,)]


# ---------------------------------------------------------------------------------------------
# RANet structure.

def test_reference_cifar_script_config_exits():
    """Channels measured on the reference PyTorch implementation (input of each classifier)."""
    model = get_model(ModelConfig(**SCRIPT_RANET))
    assert model.num_exits == 8
    assert [e.channels for e in model.exits] == [160, 256, 140, 188, 93, 117, 180, 204]
    assert [e.resolution for e in model.exits] == [8] * 8
    assert [e.index for e in model.exits] == list(range(1, 9))


def _layers_per_block(model: StagedClassifier) -> dict:
    """{(flow, block): number of dense/fusion layers}, read off the layer names."""
    layer_indices = collections.defaultdict(set)
    for stage in model.stages:
        for layer in stage.layers:
            match = re.match(r"flow(\d+)_block(\d+)_layer(\d+)_", layer.name)
            if match:
                layer_indices[int(match[1]), int(match[2])].add(int(match[3]))
    return {key: len(indices) for key, indices in sorted(layer_indices.items())}


def test_step_mode_lg_grows_the_layers_per_block():
    even = get_model(TINY_RANET)
    lg = get_model(dataclasses.replace(TINY_RANET, step_mode="lg"))
    # Flow 0 has one plain block; flow 1 fuses block 1 with flow 0 and adds plain block 2;
    # flow 2 fuses blocks 1-2 with flow 1 and adds plain block 3. 'lg': step x block layers.
    assert _layers_per_block(even) == {(0, 1): 1, (1, 1): 1, (1, 2): 1,
                                       (2, 1): 1, (2, 2): 1, (2, 3): 1}
    assert _layers_per_block(lg) == {(0, 1): 1, (1, 1): 1, (1, 2): 2,
                                     (2, 1): 1, (2, 2): 2, (2, 3): 3}
    assert even.exits[1].channels != lg.exits[1].channels


@pytest.mark.parametrize("step_mode, step, expected", [
    ("even", 4, [4, 4, 4]), ("lg", 4, [4, 8, 12]), ("lg", 2, [2, 4, 6])])
def test_layers_in_block(step_mode, step, expected):
    config = ModelConfig(step_mode=step_mode, step=step)
    assert [layers_in_block(config, block) for block in (1, 2, 3)] == expected


@pytest.mark.parametrize("num_blocks, block_step, expected_exits", [(1, 1, 3), (2, 1, 4), (1, 3, 7)])
def test_num_blocks_and_block_step_set_the_exits(num_blocks, block_step, expected_exits):
    # As the reference: flow 0 has num_blocks plain blocks; flow f > 0 has block_step more
    # blocks than flow f - 1, and only those are plain (the rest fuse), each with an exit.
    config = dataclasses.replace(TINY_RANET, num_blocks=num_blocks, block_step=block_step)
    assert get_model(config).num_exits == expected_exits


def test_growth_rate_and_base_channels_reach_the_model():
    base = get_model(TINY_RANET)
    wider = get_model(dataclasses.replace(TINY_RANET, growth_rate=6, base_channels=12))
    # Exit 1 reads flow 0's block: base_channels*4 stem channels plus step*growth_rate*4 grown
    # (growth factor 4 in flow 0; one dense layer per block).
    assert base.exits[0].channels == 4 * 4 + 1 * 4 * 4
    assert wider.exits[0].channels == 12 * 4 + 1 * 6 * 4
    assert base.stages[0].get_layer("stem1_conv").filters == 4 * 2
    assert wider.stages[0].get_layer("stem1_conv").filters == 12 * 2


# ---------------------------------------------------------------------------------------------
# Configuration errors.

@pytest.mark.parametrize("overrides, match", [
    (dict(scale_list=(2, 3), growth_factors=(2, 1), bottleneck_factors=(2, 1)),
     r"scale_list must start at 1.*Received: scale_list=2-3"),
    (dict(scale_list=(1, 3), growth_factors=(2, 1), bottleneck_factors=(2, 1)),
     r"rise by 0 or 1.*Received: scale_list=1-3"),
    (dict(scale_list=(1, 2, 3), growth_factors=(4, 2), bottleneck_factors=(4, 2, 1)),
     r"one entry per scale flow \(3\).*growth_factors=\(4, 2\)"),
    (dict(scale_list=(1, 2), growth_factors=(2, 1), bottleneck_factors=(2,)),
     r"one entry per scale flow \(2\).*bottleneck_factors=\(2,\)"),
    (dict(pretrained="imagenet"), r"pretrained=imagenet exists only for resnet50.*model=ranet"),
    (dict(step_mode="log"), r"step_mode must be one of even, lg.*'log'"),
    (dict(growth_rate=0), r"growth_rate must be positive"),
    (dict(num_classes=1), r"num_classes must be > 1"),
    (dict(image_size=30), r"image_size must be a multiple of 8"),
])
def test_invalid_ranet_configs_raise_helpful_errors(overrides, match):
    with pytest.raises(ValueError, match=match):
        models.validate(ModelConfig(**overrides))


def test_unknown_model_name_lists_the_known_names():
    with pytest.raises(ValueError, match=r"ranet, msdnet, vgg16, resnet50.*Received: model='foo'"):
        ModelConfig(name="foo")


def test_registry_rejects_an_unknown_name_listing_the_known_ones():
    config = ModelConfig(name="vgg16")
    object.__setattr__(config, "name", "foo")  # past the config's own check, to the registry's
    with pytest.raises(ValueError, match=r"must be one of ranet, msdnet, vgg16, resnet50.*'foo'"):
        get_model(config)


def test_trainable_classifiers_leaves_exactly_the_exits_classifiers_trainable():
    model = get_model(TINY_RANET)
    everything = {v.path for v in model.trainable_variables}
    models.set_trainable(TINY_RANET, model, "classifiers")
    trainable = {v.path for v in model.trainable_variables}
    # Per exit: two convolutions with their batch norms, and the linear layer.
    expected = {f"exit{k}_{part}" for k in range(1, model.num_exits + 1) for part in (
        "conv1_conv/kernel", "conv1_bn/gamma", "conv1_bn/beta", "conv2_conv/kernel",
        "conv2_bn/gamma", "conv2_bn/beta", "logits/kernel", "logits/bias")}
    assert trainable == expected
    assert len(everything) > 3 * len(expected)  # the trunk holds the rest, now frozen
    models.set_trainable(TINY_RANET, model, "all")  # "all" changes nothing
    assert {v.path for v in model.trainable_variables} == expected


def test_trainable_classifiers_is_refused_for_a_model_with_one_exit():
    models.check_trainable(ModelConfig(name="vgg16"), "all")
    with pytest.raises(ValueError, match=r"vgg16 has one exit and no shared trunk.*"
                                         r"--trainable=all"):
        models.check_trainable(ModelConfig(name="vgg16"), "classifiers")


def test_pretrained_is_only_imagenet():
    assert ModelConfig(name="resnet50", pretrained="imagenet").pretrained == "imagenet"
    with pytest.raises(ValueError, match=r"pretrained must be one of None, imagenet"):
        ModelConfig(name="resnet50", pretrained="cifar")


@pytest.mark.skip(reason="pretrained='imagenet' downloads Keras' ResNet50 weights; tests stay offline")
def test_resnet50_pretrained_imagenet():
    model = get_model(ModelConfig(name="resnet50", pretrained="imagenet"))
    assert model.num_exits == 1


# ---------------------------------------------------------------------------------------------
# Mixed precision.

@pytest.mark.parametrize("policy, compute_dtype", [("mixed_float16", "float16"),
                                                    ("mixed_bfloat16", "bfloat16")])
@pytest.mark.parametrize("config", [TINY_RANET, ModelConfig(name="vgg16"),
                                    ModelConfig(name="mobilenet_v2")],
                         ids=["ranet", "vgg16", "mobilenet_v2"])
def test_mixed_precision(config, policy, compute_dtype):
    keras.mixed_precision.set_global_policy(policy)  # the autouse fixture restores float32
    model = get_model(config)
    images = _images(batch=2)

    outputs = model(images, training=False)
    assert [_dtype(logits) for logits in outputs] == ["float32"] * model.num_exits

    convs = [layer for stage in model.stages for layer in stage.layers
             if isinstance(layer, (keras.layers.Conv2D, keras.layers.DepthwiseConv2D))]
    assert convs
    for conv in convs:
        assert conv.kernel.dtype == "float32", conv.name
        assert conv.compute_dtype == compute_dtype, conv.name

    # Features handed from stage to stage stay in the compute dtype; only images are float32.
    features = {IMAGES: images}
    for k, stage in enumerate(model.stages):
        assert {name: _dtype(t) for name, t in stage.input.items()} == {
            name: "float32" if name == IMAGES else compute_dtype for name in stage.input}
        logits, new_features = model.run_stage(k, features)
        assert _dtype(logits) == "float32"
        assert all(_dtype(t) == compute_dtype for t in new_features.values()), \
            {name: _dtype(t) for name, t in new_features.items()}
        features.update(new_features)
    if config.name == "ranet":
        assert len(features) > 1  # the tiny RANet does hand features from stage 1 to stage 2
    else:
        # A one-stage model has no cached features: look at the features its head reads.
        head_input = {"vgg16": "flatten", "mobilenet_v2": "pool"}[config.name]
        assert _dtype(model.stages[0].get_layer(head_input).output) == compute_dtype

"""Tests for ranet.costs: exact agreement with the reference counter, and its rules by hand."""

import math

import keras
import pytest
from keras import layers

from ranet import costs
from ranet.config import ModelConfig
from ranet.models import ExitInfo, StagedClassifier, get_model
from ranet.models.layers import classifier_dense
from ranet.models.staged import StageBuilder
from tests.helpers import REPO_ROOT

_SCRIPT = dict(scale_list=(1, 2, 3, 3), growth_factors=(4, 2, 1, 1), bottleneck_factors=(4, 2, 1, 1))

# Measured by running the reference PyTorch implementation (yangle15/RANet-pytorch,
# models/RANet.py with op_counter.py's measure_model at 32x32) with each configuration:
# total parameters, then per exit the cumulative multiply-adds and cumulative parameters.
REFERENCE = {
    # train_cifar.sh: --scale-list 1-2-3-3 --grFactor 4-2-1-1 --bnFactor 4-2-1-1, cifar10.
    "cifar10_script": (
        ModelConfig(num_classes=10, **_SCRIPT),
        3261830,
        [15814410, 31283220, 44655390, 50358312, 60654578, 63647996, 90173958, 94904592],
        [470442, 1073780, 1476756, 1868414, 2165612, 2453494, 2871636, 3261830]),
    # The argument parser's defaults: --scale-list 1-2-3 --grFactor 4-2-1 --bnFactor 4-2-1.
    "cifar10_default": (
        ModelConfig(num_classes=10),
        2451158,
        [13438730, 28907540, 42279710, 47982632, 58278898, 61272316],
        [468106, 1071444, 1474420, 1866078, 2163276, 2451158]),
    "cifar100_script": (
        ModelConfig(num_classes=100, **_SCRIPT),
        3354710,
        [15826020, 31306440, 44690220, 50404752, 60712628, 63717656, 90255228, 94997472],
        [482052, 1097000, 1511586, 1914854, 2223662, 2523154, 2952906, 3354710]),
    # The defaults with --stepmode lg --step 2.
    "cifar10_lg": (
        ModelConfig(num_classes=10, step_mode="lg", step=2),
        2547601,
        [8360714, 21765140, 32844062, 41523752, 53225778, 58921020],
        [347050, 876660, 1270165, 1754271, 2130143, 2547601]),
}


@pytest.fixture(scope="module", params=sorted(REFERENCE))
def reference_case(request):
    """(expected params, exit MACs, exit params, measured ModelCost): each model built once."""
    keras.mixed_precision.set_global_policy("float32")
    config, params, exit_macs, exit_params = REFERENCE[request.param]
    return params, exit_macs, exit_params, costs.count(get_model(config))


def test_matches_the_reference_counter_exactly(reference_case):
    params, exit_macs, exit_params, cost = reference_case
    assert cost.model == "ranet"
    assert cost.params == params
    assert [e.exit for e in cost.exits] == list(range(1, len(exit_macs) + 1))
    assert [e.macs for e in cost.exits] == exit_macs
    assert [e.params for e in cost.exits] == exit_params
    assert all(isinstance(e.macs, int) and isinstance(e.params, int) for e in cost.exits)


def test_to_json(reference_case):
    params, exit_macs, exit_params, cost = reference_case
    assert cost.to_json() == {
        "model": "ranet", "params": params,
        "exits": [{"exit": k, "macs": m, "params": p}
                  for k, (m, p) in enumerate(zip(exit_macs, exit_params), start=1)]}


def test_format_table_shows_every_exit_and_the_parameters(reference_case):
    params, exit_macs, exit_params, cost = reference_case
    table = costs.format_table(cost)
    lines = table.replace(",", "").splitlines()
    assert "ranet" in lines[0] and str(params) in lines[0].split()
    rows = {line.split()[0]: line.split() for line in lines[1:] if line.split()[0].isdigit()}
    assert sorted(rows, key=int) == [str(k) for k in range(1, len(exit_macs) + 1)]
    for k, (macs, exit_param_count) in enumerate(zip(exit_macs, exit_params), start=1):
        assert str(macs) in rows[str(k)] and str(exit_param_count) in rows[str(k)]


# ---------------------------------------------------------------------------------------------
# The counting rules, on models small enough to count by hand.

def _one_stage(image_size: int, body, num_classes: int, name: str = "toy") -> StagedClassifier:
    """Wraps body(images) -> features in a one-stage staged model, as the baselines do."""
    builder = StageBuilder(image_size)
    features = body(builder.get("images"))
    builder.end_stage(classifier_dense(features, num_classes, name="logits"))
    exit_info = ExitInfo(index=1, resolution=1, channels=features.shape[-1])
    return StagedClassifier(builder.build(name), [exit_info], name=name)


def test_counter_rules_by_hand():
    def body(images):                                                        # 8x8x3
        x = layers.Conv2D(4, 3, padding="same", use_bias=True, name="conv")(images)   # 8x8x4
        x = layers.BatchNormalization(name="bn")(x)
        x = layers.ReLU(name="relu")(x)
        x = layers.MaxPooling2D(2, name="max_pool")(x)                               # 4x4x4
        x = layers.Conv2D(6, 3, padding="same", groups=2, use_bias=False, name="grouped")(x)
        x = layers.Activation("relu", name="activation_relu")(x)                    # 4x4x6
        x = layers.AveragePooling2D(2, name="avg_pool")(x)                           # 2x2x6
        x = layers.GlobalAveragePooling2D(name="global_pool")(x)                     # 6
        x = layers.Dense(8, use_bias=False, name="hidden")(x)                        # 8
        return layers.Activation("linear", name="identity")(x)

    cost = costs.count(_one_stage(8, body, num_classes=5))

    expected_macs = (
        3 * 4 * 3 * 3 * 8 * 8         # conv: Cin*Cout*k*k*Hout*Wout; its bias costs nothing
        + 0                           # batch norm
        + 8 * 8 * 4                   # ReLU: one per output element
        + (4 * 4 * 4) * (2 * 2)       # max pool: output elements * k*k
        + 4 * 6 * 3 * 3 * 4 * 4 // 2  # grouped conv: divided by groups
        + 4 * 4 * 6                   # Activation("relu"), as ReLU
        + (2 * 2 * 6) * (2 * 2)       # average pool
        + 2 * 2 * 6                   # global average pool: one per input element
        + 6 * 8                       # dense without bias: weights
        + 0                           # Activation("linear")
        + 8 * 5 + 5)                  # the exit's dense: weights + bias
    expected_params = (
        3 * 4 * 3 * 3 + 4             # conv kernel + bias
        + 2 * 4                       # batch norm gamma and beta (not the moving statistics)
        + (4 // 2) * 6 * 3 * 3        # grouped conv kernel
        + 6 * 8                       # hidden dense
        + 8 * 5 + 5)                  # exit dense
    assert cost == costs.ModelCost(model="toy", params=expected_params,
                                   exits=[costs.ExitCost(1, expected_macs, expected_params)])
    assert (expected_macs, expected_params) == (9461, 321)  # the arithmetic above, evaluated


def test_costs_are_cumulative_over_stages():
    builder = StageBuilder(8)
    # Stage 1: conv 8x8x3 -> 8x8x4 (cached for stage 2), global pool, exit.
    features = layers.Conv2D(4, 3, padding="same", use_bias=False, name="conv1")(
        builder.get("images"))
    builder.put("features", features)
    pooled = layers.GlobalAveragePooling2D(name="pool1")(features)
    builder.end_stage(classifier_dense(pooled, 3, name="logits1"))
    # Stage 2 reads the cached features: nothing of stage 1 is counted twice.
    x = layers.Conv2D(2, 1, use_bias=False, name="conv2")(builder.get("features"))
    x = layers.GlobalAveragePooling2D(name="pool2")(x)
    builder.end_stage(classifier_dense(x, 3, name="logits2"))
    model = StagedClassifier(builder.build("two"), [ExitInfo(1, 8, 4), ExitInfo(2, 8, 2)],
                             name="two")

    stage1_macs = 3 * 4 * 9 * 8 * 8 + 8 * 8 * 4 + (4 * 3 + 3)
    stage1_params = 3 * 4 * 9 + (4 * 3 + 3)
    stage2_macs = 4 * 2 * 1 * 8 * 8 + 8 * 8 * 2 + (2 * 3 + 3)
    stage2_params = 4 * 2 + (2 * 3 + 3)
    cost = costs.count(model)
    assert cost.exits == [
        costs.ExitCost(1, stage1_macs, stage1_params),
        costs.ExitCost(2, stage1_macs + stage2_macs, stage1_params + stage2_params)]
    assert cost.params == stage1_params + stage2_params


def test_vgg16_by_hand():
    # VGG16 ('D'): 13 conv3x3-BN-ReLU, 2x2 max pool after each group, linear head on 1x1x512.
    layout = (64, 64, "pool", 128, 128, "pool", 256, 256, 256, "pool",
              512, 512, 512, "pool", 512, 512, 512, "pool")
    macs, params, size, channels = 0, 0, 32, 3
    for item in layout:
        if item == "pool":
            size //= 2
            macs += size * size * channels * 2 * 2
        else:
            macs += channels * item * 3 * 3 * size * size + size * size * item  # conv + ReLU
            params += channels * item * 3 * 3 + 2 * item                        # kernel + BN
            channels = item
    macs += 512 * 10 + 10
    params += 512 * 10 + 10

    cost = costs.count(get_model(ModelConfig(name="vgg16", num_classes=10)))
    assert cost.params == params == 14724042
    assert cost.exits == [costs.ExitCost(1, macs, params)]
    # The first conv alone is 3*64*9*32*32 of them.
    assert 3 * 64 * 9 * 32 * 32 == 1769472 and cost.exits[0].macs == 313603082


def test_costs_do_not_depend_on_the_precision_policy():
    tiny = ModelConfig(scale_list=(1, 2), growth_factors=(2, 1), bottleneck_factors=(2, 1),
                       base_channels=8, growth_rate=4, num_blocks=1, block_step=1, step=2)
    float32 = costs.count(get_model(tiny))
    keras.mixed_precision.set_global_policy("mixed_float16")  # the autouse fixture restores it
    assert costs.count(get_model(tiny)) == float32


def test_unknown_layer_type_raises_naming_the_layer():
    def body(images):
        x = layers.LayerNormalization(name="mystery_norm")(images)
        return layers.GlobalAveragePooling2D(name="pool")(x)

    model = _one_stage(8, body, num_classes=3)
    with pytest.raises(TypeError, match=r"LayerNormalization.*'mystery_norm'.*ranet/costs.py"):
        costs.count(model)


def test_format_table_of_a_one_exit_model():
    cost = costs.ModelCost(model="toy", params=1234567, exits=[costs.ExitCost(1, 7654321, 1234567)])
    table = costs.format_table(cost)
    assert table.splitlines()[0].startswith("toy: 1,234,567 parameters")
    assert "7,654,321" in table.splitlines()[-1] and table.splitlines()[-1].split()[0] == "1"


# ---------------------------------------------------------------------------------------------
# The reference's ImageNet configurations at 224x224 (issue 13), counted by its op_counter.py
# (tests/fixtures/reference/imagenet_counts.json, HOW_MADE.md section 1).

_IMAGENET = dict(imagenet=True, image_size=224, num_classes=1000, growth_rate=16, step=8,
                 step_mode="even", scale_list=(1, 2, 3, 4))
IMAGENET_REFERENCE = {
    # train_imagenet.sh.
    "imagenet_a": ModelConfig(**_IMAGENET, growth_factors=(4, 2, 1, 1),
                              bottleneck_factors=(4, 2, 1, 1)),
    # The README's command: wider.
    "imagenet_b": ModelConfig(**_IMAGENET, base_channels=32, growth_factors=(4, 2, 2, 1),
                              bottleneck_factors=(4, 2, 2, 1)),
}


# The wide configuration (131 M parameters) takes 10 s to build: in the slow tier.
@pytest.mark.parametrize("name", [pytest.param(name, marks=pytest.mark.slow)
                                  if name == "imagenet_b" else name
                                  for name in sorted(IMAGENET_REFERENCE)])
def test_imagenet_configurations_match_the_reference_counter(name):
    import json
    counts = json.loads((REPO_ROOT / "tests" / "fixtures" / "reference" /
                         "imagenet_counts.json").read_text())[name]
    keras.mixed_precision.set_global_policy("float32")
    cost = costs.count(get_model(IMAGENET_REFERENCE[name]))
    assert cost.params == counts["params_sum_numel"]
    assert [e.macs for e in cost.exits] == [int(m) for m in counts["macs_per_exit_cumulative"]]
    assert [e.params for e in cost.exits] == counts["params_op_counter_cls_params"]


# torchvision's resnet50 has 25,557,032 parameters; its vgg16_bn 138,365,992, of which 4,224
# are conv biases that the batch norm after each conv makes redundant (ranet's convs have none).
@pytest.mark.parametrize("name, params", [("vgg16", 138_365_992 - 4_224),
                                          ("resnet50", 25_557_032)])
def test_imagenet_baselines_have_the_standard_parameter_counts(name, params):
    keras.mixed_precision.set_global_policy("float32")
    cost = costs.count(get_model(ModelConfig(name=name, imagenet=True, image_size=224,
                                             num_classes=1000)))
    assert cost.params == params


def _mobilenet_v2_cost(imagenet: bool) -> costs.ModelCost:
    keras.mixed_precision.set_global_policy("float32")
    return costs.count(get_model(ModelConfig(
        name="mobilenet_v2", imagenet=imagenet, image_size=224 if imagenet else 32,
        num_classes=1000 if imagenet else 10)))


def test_imagenet_mobilenet_v2_counts_equal_keras_applications():
    reference = keras.applications.MobileNetV2(weights=None, input_shape=(224, 224, 3))
    cost = _mobilenet_v2_cost(imagenet=True)
    assert cost.params == sum(math.prod(v.shape) for v in reference.trainable_weights) == 3_504_872
    # The same counting rules over Keras' own graph (depthwise convolutions included).
    assert cost.exits[-1].macs == costs._graph_macs(reference)


def test_cifar_mobilenet_v2_differs_from_the_imagenet_form_only_as_its_strides_say():
    imagenet, cifar = _mobilenet_v2_cost(imagenet=True), _mobilenet_v2_cost(imagenet=False)
    # Same layers; only the classifier's width differs (1,280 inputs, 1,000 vs 10 classes).
    assert imagenet.params - cifar.params == 1281 * (1000 - 10)
    # Stride 1 in the stem and the first stride-2 stage: 32x32 reaches the last stage at 4x4.
    model = get_model(ModelConfig(name="mobilenet_v2", num_classes=10))
    pool = model.stages[0].get_layer("pool")
    assert tuple(pool._inbound_nodes[0].input_tensors[0].shape[1:]) == (4, 4, 1280)


@pytest.mark.parametrize("preset, reference", [("ranet_imagenet", "imagenet_a"),
                                               ("ranet_imagenet_wide", "imagenet_b")])
def test_imagenet_presets_are_the_counted_configurations(preset, reference):
    from ranet import cli
    assert cli.preset_config(preset).model == IMAGENET_REFERENCE[reference]


# MSDNet: the counts of the reference's own counter (kalviny/MSDNet-PyTorch op_counter.py),
# one configuration per process, made as tests/fixtures/msdnet/HOW_MADE.md says.
MSDNET_COUNTS = REPO_ROOT / "tests" / "fixtures" / "msdnet" / "counts.json"
# The reference's argument names (its args.py) and the flags here that mean the same.
MSDNET_REFERENCE_FLAGS = {
    "--data": "--dataset", "--nBlocks": "--num_blocks", "--stepmode": "--step_mode",
    "--step": "--step", "--base": "--base_layers", "--nChannels": "--base_channels",
    "--growthRate": "--growth_rate", "--grFactor": "--growth_factors",
    "--bnFactor": "--bottleneck_factors", "--prune": "--prune", "--reduction": "--reduction",
    "--bottleneck": "--bottleneck",
}
# Which preset is which counted configuration.
MSDNET_PRESETS = {"msdnet_cifar10": "cifar10_paper", "msdnet_cifar100": "cifar100_paper",
                  "msdnet_imagenet": "imagenet_step4", "msdnet_imagenet_step7": "imagenet_step7",
                  "msdnet_cifar10_1h_cpu": "cifar10_paper"}


# Its argparse defaults, where they differ from the defaults here (RANet's).
MSDNET_REFERENCE_DEFAULTS = ["--nBlocks", "1", "--nChannels", "32", "--base", "4", "--step", "1",
                             "--growthRate", "6", "--grFactor", "1-2-4", "--bnFactor", "1-2-4"]


def msdnet_flags(reference_flags) -> list:
    """The flags here for the reference's argument list (``--bottleneck ""`` is its False)."""
    result = ["--model=msdnet"]
    flags = MSDNET_REFERENCE_DEFAULTS + list(reference_flags)
    for name, value in zip(flags[::2], flags[1::2]):
        if name == "--arch":
            continue
        if name == "--bottleneck":
            value = "true" if value else "false"  # its argparse type is bool(str)
        result.append(f"{MSDNET_REFERENCE_FLAGS[name]}={value.lower()}")
    return result


def _msdnet_config(name: str) -> ModelConfig:
    import json

    from tests.reference.test_importing import config_from_flags
    counted = {**json.loads(MSDNET_COUNTS.read_text()),
               **json.loads(MSDNET_COUNTS.with_name("counts_extra.json").read_text())}
    return config_from_flags("/nonexistent", msdnet_flags(counted[name]["flags"])).model


# The 62 M-parameter ImageNet model takes ~10 s to build: in the slow tier.
@pytest.mark.parametrize("name", [
    pytest.param(name, marks=pytest.mark.slow) if name == "imagenet_step7" else name
    for name in ["cifar10_paper", "cifar100_paper", "imagenet_step4", "imagenet_step7",
                 "cifar10_lin_grow", "cifar100_anytime", "cifar10_prune_min",
                 "cifar10_no_bottleneck", "cifar10_reduction1"]])
def test_msdnet_matches_the_reference_counter_exactly(name):
    import json
    counts = json.loads(MSDNET_COUNTS.read_text())[name]
    _assert_msdnet_counts(name, counts)


def test_msdnet_without_transitions_matches_the_reference_counter():
    import json
    counts = json.loads(MSDNET_COUNTS.with_name("counts_extra.json").read_text())
    _assert_msdnet_counts("cifar10_reduction0", counts["cifar10_reduction0"])


def _assert_msdnet_counts(name, counts):
    keras.mixed_precision.set_global_policy("float32")
    config = _msdnet_config(name)
    cost = costs.count(get_model(config))
    assert cost.model == "msdnet"
    assert cost.params == counts["params"]
    assert [e.macs for e in cost.exits] == counts["exit_macs"]
    assert [e.params for e in cost.exits] == counts["exit_params"]


@pytest.mark.parametrize("preset", sorted(MSDNET_PRESETS))
def test_msdnet_presets_are_the_counted_configurations(preset):
    from ranet import cli
    model = cli.preset_config(preset).model
    assert model == _msdnet_config(MSDNET_PRESETS[preset])

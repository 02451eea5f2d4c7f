"""MSDNet specifics: the layer plan by hand, the argument checks, the variants of the
reference's arguments. The contract every model keeps is tested in test_models.py, the
counts and logits against the reference in test_costs.py and tests/reference."""

import dataclasses

import numpy as np
import pytest

from helpers import TINY_MSDNET
from ranet.errors import UsageError
from ranet.models import get_model, gradient_equilibrium, msdnet

# The RANet paper's MSDNet (flags/msdnet_cifar10.cfg).
PAPER = dataclasses.replace(TINY_MSDNET, num_blocks=10, step=2, base_layers=4,
                            base_channels=16, growth_rate=6)


def _layer_names(model):
    return [layer.name for stage in model.stages for layer in stage.layers]


def test_paper_plan_drops_a_scale_twice_each_with_a_transition():
    # 4 + 9 x 2 = 22 layers over 3 scales: a drop every ceil(22 / 3) = 8 layers, so at
    # layers 9 (block 4, its first) and 17 (block 8, its first), each followed by a transition.
    plan = msdnet.layer_plan(PAPER)
    assert msdnet.block_layers(PAPER) == [4] + [2] * 9
    transitions = [(b, p.position) for b, block in enumerate(plan, start=1)
                   for p in block if p.kind == "transition"]
    assert transitions == [(4, 1), (8, 1)]
    assert [p.out_scales for p in plan[3]] == [2, 2, 2]
    assert [p.out_scales for p in plan[7]] == [1, 1, 1]
    assert plan[0][0].position == 1  # blocks.0.0 is the first layer
    # Base channels: 16 + 9 x 6 = 70, halved to 35, + 6 = 41; + 7 x 6 = 83, halved to 41,
    # + 6 = 47; + 4 x 6 = 71 at the end.
    assert [p.channels for p in plan[3]] == [70, 35, 41]
    assert [p.channels for p in plan[7]] == [83, 41, 47]
    assert plan[-1][-1].channels == 71
    assert msdnet.unread_branches(PAPER) == []


def test_paper_exits_read_the_coarsest_scale():
    model = get_model(PAPER)
    assert [e.resolution for e in model.exits] == [8] * 10
    assert model.exits[-1].channels == 71 * 4


def test_lin_grow_and_prune_min_plans():
    lin_grow = dataclasses.replace(PAPER, num_blocks=5, step_mode="lin_grow", step=1,
                                   base_layers=1)
    assert msdnet.block_layers(lin_grow) == [1, 2, 3, 4, 5]
    prune_min = dataclasses.replace(PAPER, num_blocks=5, prune="min")
    layers = [p for block in msdnet.layer_plan(prune_min) for p in block]
    # min keeps every scale until the last layers: 12 layers, scales 3 ... 3, 2, 1.
    assert [p.out_scales for p in layers if p.kind == "layer"] == [3] * 10 + [2, 1]
    # Its transitions follow layers floor(12 / 3) = 4 and floor(24 / 3) = 8.
    counted = 0
    for p in layers:
        counted += p.kind == "layer"
        if p.kind == "transition":
            assert counted in (4, 8)


def test_without_bottleneck_there_is_no_1x1_convolution_in_the_dense_layers():
    with_bottleneck = _layer_names(get_model(TINY_MSDNET))
    without = _layer_names(get_model(dataclasses.replace(TINY_MSDNET, bottleneck=False)))
    assert any("_1x1_" in name for name in with_bottleneck)
    assert not any("_1x1_" in name for name in without)


def test_gradient_equilibrium_changes_gradients_not_outputs():
    images = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype("float32")
    plain = get_model(TINY_MSDNET)
    with gradient_equilibrium(True):
        balanced = get_model(TINY_MSDNET)
    values = {v.path: v for v in plain.variables}
    for variable in balanced.variables:
        variable.assign(values[variable.path])
    names = _layer_names(balanced)
    assert "block1_head_equilibrium" in names and "block2_scale2_trunk_equilibrium" in names
    for a, b in zip(plain(images), balanced(images)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("changes, message", [
    (dict(step_mode="lg"), r"step_mode must be one of even, lin_grow.*'lg'"),
    (dict(prune="middle"), r"prune must be one of max, min"),
    (dict(growth_rate=3, growth_factors=(1, 1, 2)),
     r"growth_rate x growth_factor must be even.*growth_rate=3"),
    (dict(growth_factors=(1, 2, 4, 4), bottleneck_factors=(1, 2, 4, 4)),
     r"image_size 32 does not suit 4 scales: the coarsest is 4x4.*Use fewer scales"),
    (dict(imagenet=True, image_size=224, num_classes=1000),  # 3 scales: 14x14, heads 2x2
     r"image_size 224 does not suit 3 scales: the coarsest is 14x14.*Use more scales"),
    (dict(bottleneck_factors=(1, 2)), r"one positive entry per scale"),
    (dict(reduction=1.5), r"reduction must be in \[0, 1\]"),
    (dict(base_layers=0), r"base_layers must be positive"),
])
def test_arguments_the_reference_cannot_build_are_refused(changes, message):
    with pytest.raises(UsageError, match=message):
        get_model(dataclasses.replace(TINY_MSDNET, **changes))


def test_no_transitions_with_reduction_zero():
    plan = msdnet.layer_plan(dataclasses.replace(PAPER, reduction=0.0))
    assert not any(p.kind == "transition" for block in plan for p in block)
    get_model(dataclasses.replace(TINY_MSDNET, reduction=0.0))


def test_initialised_as_the_reference_really_is_pytorch_defaults():
    """MSDNet-PyTorch's _init_weights never reaches a Conv2d or Linear, so its weights and
    biases keep PyTorch's defaults, uniform(+-1/sqrt(fan_in)); RANet's stay He-normal."""
    model = get_model(TINY_MSDNET)
    kernels = [v for v in model.trainable_variables if v.path.endswith("/kernel")]
    for kernel in kernels:
        values = np.asarray(kernel)
        bound = 1 / np.sqrt(np.prod(values.shape[:-1]))
        assert np.abs(values).max() <= bound, kernel.path
        if values.size > 2000:  # enough values for the spread of a uniform distribution
            assert abs(values.std() - bound / np.sqrt(3)) < 0.1 * bound / np.sqrt(3), kernel.path
    bias = np.asarray(next(v for v in model.trainable_variables
                           if v.path == "exit1_logits/bias"))
    assert np.all(bias != 0) and np.abs(bias).max() <= 1 / np.sqrt(128)
    ranet = get_model(dataclasses.replace(TINY_MSDNET, name="ranet", growth_factors=(4, 2, 1),
                                          bottleneck_factors=(4, 2, 1)))
    head = np.asarray(next(v for v in ranet.trainable_variables
                           if v.path == "exit1_conv2_conv/kernel"))
    assert abs(head.std() - np.sqrt(2 / (9 * 128))) < 0.05 * np.sqrt(2 / (9 * 128))
    assert not np.any(np.asarray(next(v for v in ranet.trainable_variables
                                      if v.path == "exit1_logits/bias")))

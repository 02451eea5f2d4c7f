"""MSDNet (Huang et al., ICLR 2018) as its reference implementation builds it.

Reference: kalviny/MSDNet-PyTorch, models/msdnet.py. The port keeps its structure, channel
arithmetic and forward order exactly, so that parameter counts and multiply-adds match:

* the first layer makes one feature map per scale, fine to coarse (``growth_factors`` has
  one entry per scale); each later layer grows every scale it keeps: the finest kept scale
  with a normal convolution of itself, every coarser one with a strided convolution of the
  scale above it and a normal one of itself, each half of the growth;
* ``prune`` drops the finest scale on a schedule (``layer_plan``); under ``max`` a 1x1
  transition compresses every remaining scale after each drop (``reduction``);
* block b holds ``base_layers`` (b = 1) or ``step`` / ``step * (b-1) + 1`` layers and ends
  with exit b, which reads the coarsest scale. Every exit is a stage boundary;
* the initialisation is the one the reference really trains from: PyTorch's defaults
  (``layers.pytorch_default_initialization`` says why).

One departure, where the reference computes what nothing reads: its last layer also grows
the scales finer than the coarsest, which no exit reads (only configurations whose last layer
keeps several scales, none of the presets). The port leaves those branches out
(``unread_branches``), the import skips their tensors, and its counts are lower by theirs.

Layers are named after the reference's modules: ``block{b}_layer{p}`` is
``blocks.{b-1}.{p}`` (p counts the first layer and the transitions, as the reference's
Sequential does), ``_scale{s}`` the branch of absolute scale s (0 = finest). Cross-stage
features are ``scale{s}``.
"""

import dataclasses
import math
from typing import List, Tuple

from keras import layers

from ranet.config import PRUNE_RULES, ModelConfig, check_choice, require
from ranet.models.layers import (GradientRescale, bottleneck_conv, conv_bn_relu,
                                 exit_classifier, imagenet_stem, in_gradient_equilibrium,
                                 pytorch_default_initialization)
from ranet.models.staged import ExitInfo, StageBuilder, StagedClassifier

STEP_MODES = ("even", "lin_grow")


@dataclasses.dataclass(frozen=True)
class PlannedLayer:
    """One module of a block's Sequential in the reference: a dense layer or a transition.

    ``position`` is its index in that Sequential; it outputs the ``out_scales`` coarsest
    scales, with ``channels`` x growth factor channels each (the reference's ``nIn`` after
    it); a dense layer reads ``in_scales`` scales (one more when it drops the finest), a
    transition as many as it outputs.
    """
    position: int
    kind: str             # "layer" or "transition"
    in_scales: int
    out_scales: int
    num_scales: int
    channels: int

    @property
    def offset(self) -> int:
        """The absolute scale of its first output."""
        return self.num_scales - self.out_scales

    @property
    def drops_a_scale(self) -> bool:
        return self.in_scales > self.out_scales


def block_layers(config: ModelConfig) -> List[int]:
    """Dense layers in each block (the reference's ``self.steps``)."""
    return [config.base_layers] + [
        config.step if config.step_mode == "even" else config.step * b + 1
        for b in range(1, config.num_blocks)]


def _scales_of_layer(config: ModelConfig, layer: int, total: int):
    """(in, out) scales of 1-based dense layer ``layer`` of ``total``: _build_block's rule."""
    num_scales = len(config.growth_factors)
    if config.prune == "min":
        return min(num_scales, total - layer + 2), min(num_scales, total - layer + 1)
    interval = math.ceil(total / num_scales)
    return (num_scales - math.floor(max(0, layer - 2) / interval),
            num_scales - math.floor((layer - 1) / interval))


def _transition_follows(config: ModelConfig, planned: PlannedLayer, layer: int, total: int):
    if config.reduction <= 0:
        return False
    if config.prune == "max":
        return planned.drops_a_scale
    return layer in (math.floor(total / 3), math.floor(2 * total / 3))


def layer_plan(config: ModelConfig) -> List[List[PlannedLayer]]:
    """Every block's dense layers and transitions, in the reference's order."""
    num_scales = len(config.growth_factors)
    per_block = block_layers(config)
    total, layer, plan = sum(per_block), 0, []
    channels = config.base_channels
    for block, count in enumerate(per_block):
        position = 1 if block == 0 else 0  # the first layer is blocks.0.0
        planned_block = []
        for _ in range(count):
            layer += 1
            in_scales, out_scales = _scales_of_layer(config, layer, total)
            channels += config.growth_rate
            planned = PlannedLayer(position, "layer", in_scales, out_scales, num_scales,
                                   channels)
            planned_block.append(planned)
            position += 1
            if _transition_follows(config, planned, layer, total):
                channels = math.floor(config.reduction * channels)
                planned_block.append(PlannedLayer(position, "transition", out_scales,
                                                  out_scales, num_scales, channels))
                position += 1
        plan.append(planned_block)
    return plan


def unread_branches(config: ModelConfig) -> List[Tuple[int, int, int]]:
    """(block, position, scale) of the last block's branches whose output no exit reads."""
    plan = layer_plan(config)
    live, unread = {len(config.growth_factors) - 1}, []  # the last exit reads the coarsest
    for planned in reversed(plan[-1]):
        inputs = set()
        for scale in range(planned.offset, planned.num_scales):
            if scale not in live:
                unread.append((len(plan), planned.position, scale))
                continue
            inputs.add(scale)  # the concatenation starts with it
            if planned.kind == "layer" and (scale > planned.offset or planned.drops_a_scale):
                inputs.add(scale - 1)  # the strided half of the growth reads the finer one
        live = inputs
    return sorted(unread)


def _resolution_after_stride_2(size: int) -> int:
    """A 3x3 stride-2 convolution padded by 1 (or the 3x3/2 max-pool), as PyTorch sizes it."""
    return (size - 1) // 2 + 1


def _coarsest_resolution(config: ModelConfig) -> int:
    size = config.image_size
    if config.imagenet:
        size = _resolution_after_stride_2(_resolution_after_stride_2(size))
    for _ in range(len(config.growth_factors) - 1):
        size = _resolution_after_stride_2(size)
    return size


def validate(config: ModelConfig) -> None:
    """Raises ``UsageError`` unless the arguments make an MSDNet its reference builds and runs."""
    check_choice("step_mode", config.step_mode, STEP_MODES)
    check_choice("prune", config.prune, PRUNE_RULES)
    for field in ("growth_rate", "base_channels", "num_blocks", "base_layers", "step"):
        require(getattr(config, field) > 0,
                f"{field} must be positive. Received: {field}={getattr(config, field)}")
    scales = len(config.growth_factors)
    require(scales >= 1 and len(config.bottleneck_factors) == scales
            and min(config.growth_factors + config.bottleneck_factors) > 0,
            "growth_factors and bottleneck_factors need one positive entry per scale, fine "
            f"to coarse, e.g. 1-2-4. Received: growth_factors={config.growth_factors}, "
            f"bottleneck_factors={config.bottleneck_factors}")
    odd = [f for f in config.growth_factors[1:] if config.growth_rate * f % 2]
    require(not odd, "every scale but the finest grows by two halves (a strided and a normal "
            "convolution), so growth_rate x growth_factor must be even there; the reference "
            f"fails on a channel mismatch otherwise. Received: growth_rate="
            f"{config.growth_rate}, growth_factors={config.growth_factors}")
    require(0 <= config.reduction <= 1,
            f"reduction must be in [0, 1] (0: no transitions). Received: {config.reduction}")
    coarsest = _coarsest_resolution(config)
    pooled = _resolution_after_stride_2(_resolution_after_stride_2(coarsest)) // 2
    require(pooled == 1,
            f"image_size {config.image_size} does not suit {scales} scales: the coarsest is "
            f"{coarsest}x{coarsest}, and each exit's two stride-2 convolutions and 2x2 pool "
            "must leave 1x1 (5x5 to 12x12), the one position its linear layer reads; the "
            "reference fails otherwise. Use "
            f"{'fewer' if pooled < 1 else 'more'} scales (growth_factors entries).")
    require(all(planned.channels >= 1 for block in layer_plan(config) for planned in block),
            f"reduction {config.reduction} leaves a transition without channels; raise it "
            "(or 0 for no transitions).")


def _first_layer(x, config: ModelConfig) -> List:
    """MSDNFirstLayer: the finest scale from the image, each coarser one from the finer."""
    features = []
    for scale, factor in enumerate(config.growth_factors):
        filters = config.base_channels * factor
        name = f"block1_layer0_scale{scale}"
        if scale == 0 and config.imagenet:
            x = imagenet_stem(x, filters, name=name)
        else:
            x = conv_bn_relu(x, filters, 3, strides=1 if scale == 0 else 2, name=name)
        features.append(x)
    return features


def _dense_layer(features: List, planned: PlannedLayer, config: ModelConfig, name: str) -> List:
    """MSDNLayer: ``features`` holds scales offset - drop .. S - 1 (absolute); returns the
    ``out_scales`` coarsest, each grown by growth_rate x its growth factor."""
    growth, factors = config.growth_rate, config.growth_factors
    widths, bottleneck = config.bottleneck_factors, config.bottleneck
    first_input = planned.in_scales - planned.out_scales  # 1 when the finest is dropped
    outputs = []
    for i, scale in enumerate(range(planned.offset, planned.num_scales)):
        branch = f"{name}_scale{scale}"
        same = features[first_input + i]
        if i == 0 and not planned.drops_a_scale:
            new = bottleneck_conv(same, growth * factors[scale], widths[scale], strides=1,
                                  name=f"{branch}_normal", bottleneck=bottleneck)
            outputs.append(layers.Concatenate(name=f"{branch}_concat")([same, new]))
            continue
        finer = features[first_input + i - 1]
        half = growth * factors[scale] // 2
        down = bottleneck_conv(finer, half, widths[scale - 1], strides=2,
                               name=f"{branch}_down", bottleneck=bottleneck)
        normal = bottleneck_conv(same, half, widths[scale], strides=1,
                                 name=f"{branch}_normal", bottleneck=bottleneck)
        outputs.append(layers.Concatenate(name=f"{branch}_concat")([same, down, normal]))
    return outputs


def _transition(features: List, planned: PlannedLayer, config: ModelConfig, name: str) -> List:
    """The reference's _build_transition: a 1x1 ConvBNReLU per scale to ``reduction`` of it."""
    return [conv_bn_relu(x, planned.channels * config.growth_factors[scale], kernel_size=1,
                         name=f"{name}_scale{scale}_transition")
            for scale, x in zip(range(planned.offset, planned.num_scales), features)]


def build_msdnet(config: ModelConfig) -> StagedClassifier:
    """The model, initialised as MSDNet-PyTorch's actually is (``pytorch_default_initialization``)."""
    with pytorch_default_initialization():
        return _build(config)


def _build(config: ModelConfig) -> StagedClassifier:
    builder = StageBuilder(config.image_size)
    num_scales = len(config.growth_factors)
    exits = []
    features = None
    plan = layer_plan(config)
    for block, planned_block in enumerate(plan, start=1):
        if block == 1:
            features = _first_layer(builder.get("images"), config)
        else:
            features = [builder.get(f"scale{s}")
                        for s in range(num_scales - len(features), num_scales)]
        for planned in planned_block:
            name = f"block{block}_layer{planned.position}"
            build = _dense_layer if planned.kind == "layer" else _transition
            features = build(features, planned, config, name)
        head = features[-1]
        if in_gradient_equilibrium():
            # Exit k of K (1-based): its classifier's gradient x 1/(K-k+1), the gradient of
            # every scale that goes on x (K-k)/(K-k+1): IMTA's rule, written for MSDNet.
            remaining = len(plan) - block + 1
            head = GradientRescale(1.0 / remaining, name=f"block{block}_head_equilibrium")(head)
            features = [GradientRescale((remaining - 1) / remaining,
                                        name=f"block{block}_scale{s}_trunk_equilibrium")(x)
                        for s, x in zip(range(num_scales - len(features), num_scales),
                                        features)]
        for s, x in zip(range(num_scales - len(features), num_scales), features):
            builder.put(f"scale{s}", x)
        logits = exit_classifier(head, config.num_classes, config.imagenet, index=block)
        exits.append(ExitInfo(index=block, resolution=head.shape[1], channels=head.shape[-1]))
        builder.end_stage(logits)
    return StagedClassifier(builder.build("msdnet"), exits, name="msdnet")

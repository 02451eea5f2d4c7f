"""RANet (Yang et al., CVPR 2020) as the reference implementation builds it.

Reference: yangle15/RANet-pytorch, models/RANet.py. The port keeps its
structure, channel arithmetic and forward order exactly, so that parameter
counts and multiply-adds match:

* scale flows run from the lowest resolution to the highest; flow i has
  ``block_step * i + num_blocks`` blocks;
* the first blocks of a flow fuse features of the previous (lower-resolution)
  flow, block for block and dense layer for dense layer; the rest are plain
  dense blocks, each followed by an exit (``num_blocks`` in the first flow,
  ``block_step`` in each later one);
* every exit is a stage boundary: the stage holds everything computed between
  the previous exit and this one.

Cross-stage features are named ``stem{f}`` (stem output for flow f),
``flow{f}_x`` (running features of flow f) and ``flow{f}_block{b}_dense{j}``
(input and dense-layer outputs of block b, read by flow f + 1's fusion).
"""

import math

from keras import layers

from ranet.config import ModelConfig, check_choice, require
from ranet.models.layers import (GradientRescale, bottleneck_conv, conv_bn_relu, exit_classifier,
                                 imagenet_stem, in_gradient_equilibrium, resize_to)
from ranet.models.staged import ExitInfo, StageBuilder, StagedClassifier

STEP_MODES = ("even", "lg")



def validate(config: ModelConfig) -> None:
    """Raises ``UsageError`` unless the architecture arguments make a RANet the reference builds."""
    scales = config.scale_list
    require(len(scales) >= 1 and scales[0] == 1 and
            all(b - a in (0, 1) for a, b in zip(scales, scales[1:])),
            "scale_list must start at 1 and rise by 0 or 1 per flow, e.g. 1-2-3 or 1-2-3-3. "
            f"Received: scale_list={'-'.join(map(str, scales))}")
    require(len(config.growth_factors) == len(scales) == len(config.bottleneck_factors),
            "growth_factors and bottleneck_factors need one entry per scale flow "
            f"({len(scales)}). Received: growth_factors={config.growth_factors}, "
            f"bottleneck_factors={config.bottleneck_factors}")
    stem_stride = 4 if config.imagenet else 1  # the 7x7/2 conv and the max-pool
    require(config.image_size // stem_stride // 2 ** (max(scales) - 1) >= 4,
            f"image_size {config.image_size} is too small for {max(scales)} resolutions")
    for field in ("growth_rate", "base_channels", "num_blocks", "step"):
        require(getattr(config, field) > 0,
                f"{field} must be positive. Received: {field}={getattr(config, field)}")
    require(config.block_step >= 1 or len(scales) == 1,
            "block_step must be >= 1 with several flows: each later flow's exits are its "
            f"block_step plain blocks. Received: block_step={config.block_step}")
    check_choice("step_mode", config.step_mode, STEP_MODES)
    if len(scales) > 1:
        smallest_growth = config.growth_rate * min(config.growth_factors[1:])
        require(int(smallest_growth * config.compress_factor) >= 1,
                "growth_rate x growth_factor x compress_factor must be >= 1 for every fusing "
                f"flow, or its fusion layers get no channels. Received: growth_rate="
                f"{config.growth_rate}, growth_factors={config.growth_factors}, "
                f"compress_factor={config.compress_factor}")
    require(0 < config.compress_factor < 1 and 0 < config.reduction <= 1,
            "compress_factor must be in (0, 1) and reduction in (0, 1]. Received: "
            f"compress_factor={config.compress_factor}, reduction={config.reduction}")


def _dense_layer(x, growth: int, bottleneck_width: int, name: str):
    """ConvNormal: append ``growth`` new channels to x."""
    new = bottleneck_conv(x, growth, bottleneck_width, strides=1, name=name)
    return layers.Concatenate(name=f"{name}_concat")([x, new])


def _fusion_layer(low, high, growth: int, bottleneck_width: int, low_bottleneck_width: int,
                  compress_factor: float, down: bool, name: str):
    """ConvUpNormal: grow the high-resolution path with a share from the low-resolution one."""
    from_low = math.floor(growth * compress_factor)
    new = bottleneck_conv(high, growth - from_low, bottleneck_width, strides=2 if down else 1,
                           name=f"{name}_normal")
    size = new.shape[1]
    up = bottleneck_conv(low, from_low, low_bottleneck_width, strides=1, name=f"{name}_up")
    return layers.Concatenate(name=f"{name}_concat")([
        resize_to(high, size, name=f"{name}_identity_resize"),
        resize_to(up, size, name=f"{name}_up_resize"),
        new])


def _trans_flag(block: int, blocks_in_flow: int, scale: int) -> bool:
    """Whether 1-based block ``block`` ends with a transition (reference: _trans_flag)."""
    return any(block == math.floor((i + 1) * blocks_in_flow / scale) for i in range(scale - 1))


def _stem(builder: StageBuilder, config: ModelConfig) -> None:
    """RAFirstLayer: the highest resolution first, then one ConvBNReLU per further flow."""
    num_flows = len(config.scale_list)
    x = builder.get("images")
    previous_scale = None
    for flow in reversed(range(num_flows)):
        scale = config.scale_list[flow]
        strides = 1 if previous_scale in (None, scale) else 2
        filters = config.base_channels * config.growth_factors[flow]
        if previous_scale is None and config.imagenet:
            x = imagenet_stem(x, filters, name=f"stem{flow}")
        else:
            x = conv_bn_relu(x, filters, 3, strides, name=f"stem{flow}")
        builder.put(f"stem{flow}", x)
        previous_scale = scale


def layers_in_block(config: ModelConfig, block: int) -> int:
    """Dense layers in the 1-based ``block`` of any flow.

    The reference grows one shared ``steps`` list as it builds plain blocks;
    entry b-1 is ``step`` ('even') or ``b * step`` ('lg'), and fusing blocks
    reuse the entry of the block they fuse with.
    """
    return config.step * (block if config.step_mode == "lg" else 1)


def build_ranet(config: ModelConfig) -> StagedClassifier:
    num_flows = len(config.scale_list)
    blocks_per_flow = [0] + [config.block_step * f + config.num_blocks for f in range(num_flows)]
    num_exits = config.num_blocks + (num_flows - 1) * config.block_step
    builder = StageBuilder(config.image_size)
    _stem(builder, config)
    exits = []

    for flow in range(num_flows):
        scale = config.scale_list[flow]
        growth = config.growth_rate * config.growth_factors[flow]
        width = config.bottleneck_factors[flow]
        num_blocks = blocks_per_flow[flow + 1]
        # The reference's expression, Python slicing quirks included.
        down_blocks = blocks_per_flow[:flow + 1][-(scale - 1):]
        builder.put(f"flow{flow}_x", builder.get(f"stem{flow}"))

        for block in range(1, num_blocks + 1):
            name = f"flow{flow}_block{block}"
            x = builder.get(f"flow{flow}_x")
            num_layers = layers_in_block(config, block)
            dense_outputs = [x]
            fusing = block <= blocks_per_flow[flow]
            for j in range(num_layers):
                if fusing:
                    low = builder.get(f"flow{flow - 1}_block{block}_dense{j}")
                    down = block in down_blocks and j == num_layers - 1
                    x = _fusion_layer(low, x, growth, width, config.bottleneck_factors[flow - 1],
                                      config.compress_factor, down, name=f"{name}_layer{j}")
                else:
                    x = _dense_layer(x, growth, width, name=f"{name}_layer{j}")
                dense_outputs.append(x)
            # Each dense output is the channel prefix of the next one at its resolution
            # (concatenation puts the input first); only the last of each run is cached.
            for j, tensor in enumerate(dense_outputs):
                following = dense_outputs[j + 1] if j + 1 < len(dense_outputs) else None
                if following is not None and following.shape[1] == tensor.shape[1]:
                    builder.put_prefix(f"{name}_dense{j}", tensor, source=f"{name}_dense{j + 1}")
                else:
                    builder.put(f"{name}_dense{j}", tensor)
            if fusing:
                # conv_last: a compressed copy of the low-resolution block output.
                low = builder.get(f"flow{flow - 1}_block{block}_dense{num_layers}")
                extra = math.floor(x.shape[-1] * config.compress_factor)
                low = conv_bn_relu(low, extra, kernel_size=1, name=f"{name}_last")
                x = layers.Concatenate(name=f"{name}_concat_last")(
                    [x, resize_to(low, x.shape[1], name=f"{name}_last_resize")])
            if _trans_flag(block, num_blocks, scale):
                x = conv_bn_relu(x, math.floor(config.reduction * x.shape[-1]), kernel_size=1,
                                 name=f"{name}_transition")
            head = x
            if not fusing and in_gradient_equilibrium():
                # Exit k of K (1-based): its classifier's gradient x 1/(K-k+1), the gradient
                # of everything after it x (K-k)/(K-k+1), as IMTA does for MSDNet.
                remaining = num_exits - len(exits)
                head = GradientRescale(1.0 / remaining, name=f"{name}_head_equilibrium")(x)
                x = GradientRescale((remaining - 1) / remaining,
                                    name=f"{name}_trunk_equilibrium")(x)
            builder.put(f"flow{flow}_x", x)

            if not fusing:
                logits = exit_classifier(head, config.num_classes, config.imagenet,
                                         index=len(exits) + 1)
                exits.append(ExitInfo(index=len(exits) + 1, resolution=x.shape[1],
                                      channels=x.shape[-1]))
                builder.end_stage(logits)

    return StagedClassifier(builder.build("ranet"), exits, name="ranet")

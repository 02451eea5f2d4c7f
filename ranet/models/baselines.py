"""The baselines RANet is judged against, as one-stage staged models.

On CIFAR they are the usual variants trained from scratch: VGG16 with batch norm (13 conv
layers, a linear head on the 1x1x512 features), ResNet50 (bottlenecks 3-4-6-3 on a 3x3
stride-1 stem, no max-pool) and MobileNetV2 with stride 1 in its stem and in its first
stride-2 stage (the 24-channel one), so that a 32x32 image reaches the last stage at 4x4.
On ImageNet (``config.imagenet``) they take their standard form, torchvision's ``vgg16_bn``,
``resnet50`` and ``mobilenet_v2``: VGG16's head is two 4096-wide fully-connected layers with
dropout on the 7x7x512 features, ResNet50's stem a 7x7/2 convolution and a 3x3/2 max-pool
(the stride of a downsampling block on its 3x3, "v1.5"), MobileNetV2 the paper's width 1.0
network (Sandler et al. 2018, table 2), whose parameters and multiply-adds equal
``keras.applications.MobileNetV2``'s (tested). ``pretrained="imagenet"`` swaps in Keras'
ImageNet ResNet50 for transfer, as the seed did.
"""

import keras
from keras import layers

from ranet.config import ModelConfig
from ranet.models.layers import (batch_norm, classifier_dense, conv2d, conv_bn_relu,
                                 conv_initializer, dense_initializer)
from ranet.models.staged import ExitInfo, StageBuilder, StagedClassifier

_VGG16_LAYOUT = (64, 64, "pool", 128, 128, "pool", 256, 256, 256, "pool",
                 512, 512, 512, "pool", 512, 512, 512, "pool")
_RESNET50_STAGES = ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2))
_BOTTLENECK_EXPANSION = 4
# MobileNetV2's inverted-residual stages (Sandler et al. 2018, table 2): expansion t,
# output channels c, blocks n, stride s of the first block.
_MOBILENET_V2_STAGES = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
                        (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))
_MOBILENET_V2_STEM, _MOBILENET_V2_LAST = 32, 1280
_MOBILENET_V2_IMAGENET_DROPOUT = 0.2  # torchvision's classifier
_VGG16_IMAGENET_HIDDEN = 4096
_VGG16_IMAGENET_DROPOUT = 0.5


def _single_stage(builder: StageBuilder, features, num_classes: int, name: str) -> StagedClassifier:
    logits = classifier_dense(features, num_classes, name="logits")
    builder.end_stage(logits)
    exit_info = ExitInfo(index=1, resolution=1, channels=features.shape[-1])
    return StagedClassifier(builder.build(name), [exit_info], name=name)


def build_vgg16(config: ModelConfig) -> StagedClassifier:
    builder = StageBuilder(config.image_size)
    x = builder.get("images")
    conv_index = 0
    for block in _VGG16_LAYOUT:
        if block == "pool":
            x = layers.MaxPooling2D(2, name=f"pool{conv_index}")(x)
        else:
            conv_index += 1
            x = conv_bn_relu(x, block, 3, name=f"conv{conv_index}")
    x = layers.Flatten(name="flatten")(x)
    if config.imagenet:
        for index in (1, 2):
            x = layers.Dense(_VGG16_IMAGENET_HIDDEN, kernel_initializer=dense_initializer(),
                             name=f"fc{index}")(x)
            x = layers.ReLU(name=f"fc{index}_relu")(x)
            x = layers.Dropout(_VGG16_IMAGENET_DROPOUT, name=f"fc{index}_dropout")(x)
    return _single_stage(builder, x, config.num_classes, "vgg16")


def _bottleneck(x, width: int, strides: int, name: str):
    out_channels = width * _BOTTLENECK_EXPANSION
    shortcut = x
    if strides != 1 or x.shape[-1] != out_channels:
        shortcut = conv2d(x, out_channels, 1, strides, name=f"{name}_proj_conv")
        shortcut = batch_norm(shortcut, name=f"{name}_proj_bn")
    x = conv_bn_relu(x, width, 1, name=f"{name}_a")
    x = conv_bn_relu(x, width, 3, strides=strides, name=f"{name}_b")
    x = conv2d(x, out_channels, 1, name=f"{name}_c_conv")
    x = batch_norm(x, name=f"{name}_c_bn")
    x = layers.Add(name=f"{name}_add")([x, shortcut])
    return layers.ReLU(name=f"{name}_relu")(x)


def build_resnet50(config: ModelConfig) -> StagedClassifier:
    builder = StageBuilder(config.image_size)
    images = builder.get("images")
    if config.pretrained == "imagenet":
        # Needs a network the first time (Keras caches the weights under ~/.keras/models).
        backbone = keras.applications.ResNet50(
            include_top=False, weights="imagenet", pooling="avg",
            input_shape=(config.image_size, config.image_size, 3))
        x = backbone(images)
    else:
        if config.imagenet:
            x = conv_bn_relu(images, 64, 7, strides=2, name="stem")
            x = layers.ZeroPadding2D(1, name="stem_pool_pad")(x)  # exact after the ReLU
            x = layers.MaxPooling2D(3, strides=2, name="stem_pool")(x)
        else:
            x = conv_bn_relu(images, 64, 3, name="stem")
        for stage, (width, num_blocks, strides) in enumerate(_RESNET50_STAGES, start=1):
            for block in range(num_blocks):
                x = _bottleneck(x, width, strides if block == 0 else 1, name=f"res{stage}_{block}")
        x = layers.GlobalAveragePooling2D(name="pool")(x)
    return _single_stage(builder, x, config.num_classes, "resnet50")


def _conv_bn_relu6(x, filters: int, kernel_size: int, strides: int = 1, name: str = ""):
    x = conv2d(x, filters, kernel_size, strides, name=f"{name}_conv")
    x = batch_norm(x, name=f"{name}_bn")
    return layers.ReLU(6.0, name=f"{name}_relu6")(x)


def _inverted_residual(x, expansion: int, out_channels: int, strides: int, name: str):
    """1x1 expansion (none when t = 1), 3x3 depthwise, linear 1x1 projection; the input is
    added back when the shape allows (stride 1, same channels)."""
    in_channels = x.shape[-1]
    shortcut = x
    if expansion != 1:
        x = _conv_bn_relu6(x, in_channels * expansion, 1, name=f"{name}_expand")
    if strides > 1:  # padded as PyTorch pads, as conv2d does
        x = layers.ZeroPadding2D(1, name=f"{name}_depthwise_pad")(x)
    x = layers.DepthwiseConv2D(3, strides=strides, padding="valid" if strides > 1 else "same",
                               use_bias=False, depthwise_initializer=conv_initializer(),
                               name=f"{name}_depthwise")(x)
    x = batch_norm(x, name=f"{name}_depthwise_bn")
    x = layers.ReLU(6.0, name=f"{name}_depthwise_relu6")(x)
    x = conv2d(x, out_channels, 1, name=f"{name}_project_conv")
    x = batch_norm(x, name=f"{name}_project_bn")
    if strides == 1 and in_channels == out_channels:
        x = layers.Add(name=f"{name}_add")([x, shortcut])
    return x


def build_mobilenet_v2(config: ModelConfig) -> StagedClassifier:
    builder = StageBuilder(config.image_size)
    x = _conv_bn_relu6(builder.get("images"), _MOBILENET_V2_STEM, 3,
                       strides=2 if config.imagenet else 1, name="stem")
    for stage, (expansion, channels, num_blocks, strides) in enumerate(_MOBILENET_V2_STAGES,
                                                                      start=1):
        if stage == 2 and not config.imagenet:
            strides = 1  # the CIFAR form: 32x32 images keep their resolution one stage longer
        for block in range(num_blocks):
            x = _inverted_residual(x, expansion, channels, strides if block == 0 else 1,
                                   name=f"block{stage}_{block}")
    x = _conv_bn_relu6(x, _MOBILENET_V2_LAST, 1, name="last")
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    if config.imagenet:
        x = layers.Dropout(_MOBILENET_V2_IMAGENET_DROPOUT, name="dropout")(x)
    return _single_stage(builder, x, config.num_classes, "mobilenet_v2")

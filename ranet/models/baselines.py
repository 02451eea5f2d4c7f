"""The baselines RANet is judged against, as one-stage staged models.

On CIFAR both are the usual variants trained from scratch: VGG16 with batch norm (13 conv
layers, a linear head on the 1x1x512 features) and ResNet50 (bottlenecks 3-4-6-3 on a 3x3
stride-1 stem, no max-pool). On ImageNet (``config.imagenet``) they take their standard
form, torchvision's ``vgg16_bn`` and ``resnet50``: VGG16's head is two 4096-wide
fully-connected layers with dropout on the 7x7x512 features, and ResNet50's stem a 7x7/2
convolution and a 3x3/2 max-pool (the stride of a downsampling block on its 3x3, "v1.5").
``pretrained="imagenet"`` swaps in Keras' ImageNet ResNet50 for transfer, as the seed did.
"""

import keras
from keras import layers

from ranet.config import ModelConfig
from ranet.models.layers import (batch_norm, classifier_dense, conv2d, conv_bn_relu,
                                 dense_initializer)
from ranet.models.staged import ExitInfo, StageBuilder, StagedClassifier

_VGG16_LAYOUT = (64, 64, "pool", 128, 128, "pool", 256, 256, 256, "pool",
                 512, 512, 512, "pool", 512, 512, 512, "pool")
_RESNET50_STAGES = ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2))
_BOTTLENECK_EXPANSION = 4
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

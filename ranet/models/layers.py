"""The building blocks every model here is made of, with the reference's conventions.

Convolutions without bias followed by batch norm and ReLU, PyTorch's initialisation and batch
norm hyper-parameters, a fused batch norm (one TensorFlow kernel that Grappler folds into the
convolution at inference), float32 exit layers, and align-corners bilinear resizes.
"""

import contextlib
import contextvars
import math
from typing import Tuple

import keras
import tensorflow as tf
from keras import layers

# PyTorch's BatchNorm2d defaults (momentum 0.1 there is 0.9 here), as the reference trains.
_BN_MOMENTUM = 0.9
_BN_EPSILON = 1e-5


# One initializer object per layer, made when the layer is: an unseeded Keras initializer
# draws its integer seed from Python's `random` when it is constructed, so constructing it
# at build time (after keras.utils.set_random_seed) makes the weights a function of --seed,
# the same in every process. A single module-level instance would have drawn its seed at
# import (different in every process) and given every kernel of one shape the same values.
def conv_initializer() -> keras.initializers.Initializer:
    """normal(0, sqrt(2 / (k * k * out_channels))): the reference's conv initialisation;
    PyTorch's default inside ``pytorch_default_initialization``."""
    if _PYTORCH_DEFAULT_INIT.get():
        return dense_initializer()
    return keras.initializers.VarianceScaling(2.0, "fan_out", "untruncated_normal")


def dense_initializer() -> keras.initializers.Initializer:
    """PyTorch's default weight initialisation of nn.Linear and nn.Conv2d,
    uniform(+-1/sqrt(fan_in)) (kaiming_uniform with a = sqrt(5))."""
    return keras.initializers.VarianceScaling(1.0 / 3.0, "fan_in", "uniform")


def _bias_initializer(fan_in: int):
    """Zeros, as the RANet reference leaves its biases; PyTorch's default,
    uniform(+-1/sqrt(fan_in)), inside ``pytorch_default_initialization``."""
    if not _PYTORCH_DEFAULT_INIT.get():
        return "zeros"
    bound = 1.0 / math.sqrt(fan_in)
    return keras.initializers.RandomUniform(-bound, bound)


@contextlib.contextmanager
def _set_during(variable: contextvars.ContextVar, value):
    """Models built inside the block see ``value``; the previous one is back after it."""
    token = variable.set(value)
    try:
        yield
    finally:
        variable.reset(token)


# Set around a model build by ``pytorch_default_initialization``.
_PYTORCH_DEFAULT_INIT = contextvars.ContextVar("pytorch_default_init", default=False)


def pytorch_default_initialization():
    """Convolutions and exit layers built inside start as PyTorch's defaults leave them:
    weights and biases uniform(+-1/sqrt(fan_in)).

    MSDNet-PyTorch trains from these: its ``_init_weights`` meant He-normal convolutions and
    zero linear biases, but it visits only the direct children of its blocks and classifiers
    (MSDNet layers and Sequentials, never a Conv2d or Linear), so it changes nothing.
    """
    return _set_during(_PYTORCH_DEFAULT_INIT, True)


# Set around a model build by ``conv_padding`` (``ModelConfig.conv_padding``).
_CONV_PADDING = contextvars.ContextVar("conv_padding", default="pytorch")


def conv_padding(mode: str):
    """Convolutions built inside pad as ``mode`` says ("pytorch" or "same"; see ``conv2d``)."""
    return _set_during(_CONV_PADDING, mode)


def conv2d(x, filters: int, kernel_size: int, strides: int = 1, use_bias: bool = False,
           name: str = ""):
    """A convolution padded as PyTorch pads it: (k - 1) / 2 zeros on every side.

    Keras' "same" does that at stride 1, but at stride 2 on an even size it pads (0, 1): the
    sampling grid moves by a pixel and weights trained by the reference would see other
    inputs. Strided convolutions pad explicitly instead (``ZeroPadding2D``, then "valid"),
    unless built inside ``conv_padding("same")`` (models trained before this was so).
    """
    padding = "same"
    if strides > 1 and kernel_size > 1 and _CONV_PADDING.get() == "pytorch":
        x = layers.ZeroPadding2D((kernel_size - 1) // 2, name=f"{name}_pad")(x)
        padding = "valid"
    return layers.Conv2D(filters, kernel_size, strides=strides, padding=padding,
                         use_bias=use_bias, kernel_initializer=conv_initializer(),
                         bias_initializer=_bias_initializer(x.shape[-1] * kernel_size ** 2),
                         name=name)(x)


def conv_bn_relu(x, filters: int, kernel_size: int = 3, strides: int = 1, name: str = ""):
    """Conv (no bias) -> BatchNorm -> ReLU, the reference's ConvBasic."""
    x = conv2d(x, filters, kernel_size, strides, name=f"{name}_conv")
    x = batch_norm(x, name=f"{name}_bn")
    return layers.ReLU(name=f"{name}_relu")(x)


def bottleneck_conv(x, filters: int, bottleneck_width: int, strides: int, name: str,
                    bottleneck: bool = True):
    """MSDNet's ConvBN, kept by RANet: 1x1 to min(C, width * filters), BN, ReLU (with
    ``bottleneck``), then a 3x3 convolution, BN, ReLU."""
    if bottleneck:
        inner = min(x.shape[-1], bottleneck_width * filters)
        x = conv_bn_relu(x, inner, kernel_size=1, name=f"{name}_1x1")
    return conv_bn_relu(x, filters, kernel_size=3, strides=strides, name=f"{name}_3x3")


_IMAGENET_STEM_KERNEL = 7


def imagenet_stem(x, filters: int, name: str):
    """MSDNet's ImageNet first layer, kept by RANet: 7x7/2 conv (with a bias), BN, ReLU,
    3x3/2 max-pool.

    The max-pool pads by 1 with zeros where PyTorch pads with -inf: after the ReLU every
    value is >= 0, so the maxima are the same.
    """
    x = conv2d(x, filters, _IMAGENET_STEM_KERNEL, strides=2, use_bias=True, name=f"{name}_conv")
    x = batch_norm(x, name=f"{name}_bn")
    x = layers.ReLU(name=f"{name}_relu")(x)
    x = layers.ZeroPadding2D(1, name=f"{name}_pool_pad")(x)
    return layers.MaxPooling2D(3, strides=2, name=f"{name}_pool")(x)


_HEAD_CHANNELS = 128  # MSDNet's CIFAR classifier width, kept by RANet.
# Every layer of exit k's classifier, and no other, is named exit<k>_... (``freeze_trunk``
# and the reference checkpoint mapping read it).
EXIT_LAYER_PREFIX = "exit{index}_"


def exit_classifier(x, num_classes: int, imagenet: bool, index: int):
    """MSDNet's exit, kept by RANet: two stride-2 ConvBNReLU, 2x2 average pool, linear.

    128 channels wide on CIFAR; on ImageNet as wide as the features it reads (the
    references' _build_classifier_imagenet), which is why its heads hold most of the
    parameters.
    """
    name = EXIT_LAYER_PREFIX.format(index=index)
    width = x.shape[-1] if imagenet else _HEAD_CHANNELS
    x = conv_bn_relu(x, width, 3, strides=2, name=f"{name}conv1")
    x = conv_bn_relu(x, width, 3, strides=2, name=f"{name}conv2")
    x = average_pool(x, 2, name=f"{name}pool")
    x = layers.Flatten(name=f"{name}flatten")(x)
    return classifier_dense(x, num_classes, name=f"{name}logits")


# Set around a model build by ``synchronized_batch_norm`` (``ModelConfig.sync_batch_norm``),
# so that every builder's batch norm layers follow it without threading a flag through them.
_SYNC_BATCH_NORM = contextvars.ContextVar("sync_batch_norm", default=False)


def synchronized_batch_norm(enabled: bool):
    """Batch norm layers built inside reduce their statistics over all replicas.

    Under a tf.distribute strategy each replica then normalises with the mean
    and variance of the global batch, so N replicas of batch B/N train like
    one replica of batch B (at the price of three small all-reduces per layer and step).
    Outside ``strategy.run`` and at inference it changes nothing.
    """
    return _set_during(_SYNC_BATCH_NORM, bool(enabled))


# Set around a model build by ``gradient_equilibrium`` (``OptimConfig.gradient_equilibrium``).
_GRADIENT_EQUILIBRIUM = contextvars.ContextVar("gradient_equilibrium", default=False)


def gradient_equilibrium(enabled: bool):
    """RANet models built inside rescale the gradients at each exit (``GradientRescale``)."""
    return _set_during(_GRADIENT_EQUILIBRIUM, bool(enabled))


def in_gradient_equilibrium() -> bool:
    return _GRADIENT_EQUILIBRIUM.get()


@keras.saving.register_keras_serializable(package="ranet")
class GradientRescale(layers.Layer):
    """The identity forward; multiplies the gradient that flows back through it by ``scale``.

    Gradient equilibrium (Li et al., ICCV 2019) puts one on each path out of an exit's input:
    it balances how strongly each exit's loss pulls on the shared trunk. No weights, and
    nothing changes at inference.
    """

    def __init__(self, scale: float, **kwargs):
        super().__init__(**kwargs)
        self.scale = float(scale)

    def call(self, x):
        @tf.custom_gradient
        def rescale(value):
            return tf.identity(value), lambda upstream: upstream * tf.cast(self.scale,
                                                                          upstream.dtype)
        return rescale(x)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "scale": self.scale}


# Set around a model build by ``serving_layout``: the same weights, laid out for the LiteRT
# export (ranet.inference.serving.litert).
_SERVING_LAYOUT = contextvars.ContextVar("serving_layout", default=False)


def serving_layout(enabled: bool = True):
    """Models built inside are laid out for LiteRT's XNNPACK kernels, with the same weights.

    Two things differ, neither in the function computed nor in the variables: every feature a
    later stage reads is an output of the stage that makes it (no channel-prefix slices
    across stages: XNNPACK runs no int8 SLICE), and average pooling is a depthwise
    convolution with weights 1 / (pool area) (XNNPACK runs no int8 AVERAGE_POOL_2D).
    Training in this layout is faster on a CPU too (``--training_layout=serving``).
    """
    return _set_during(_SERVING_LAYOUT, bool(enabled))


def in_serving_layout() -> bool:
    return _SERVING_LAYOUT.get()


@keras.saving.register_keras_serializable(package="ranet")
class DepthwiseAveragePooling(layers.AveragePooling2D):
    """``AveragePooling2D`` (valid padding, channels last) as a depthwise convolution.

    The weights 1 / (pool area) are a power of two for 2x2 pools, so each product is exact
    and only the order of the sums differs from the pooling kernel.
    """

    def call(self, inputs):
        height, width = self.pool_size
        kernel = tf.fill([height, width, inputs.shape[-1], 1],
                         tf.constant(1.0 / (height * width), inputs.dtype))
        return tf.nn.depthwise_conv2d(inputs, kernel, strides=[1, *self.strides, 1],
                                      padding="VALID")


def average_pool(x, pool_size: int, name: str):
    """Average pooling (valid padding); a depthwise convolution in the serving layout."""
    pool = DepthwiseAveragePooling if in_serving_layout() else layers.AveragePooling2D
    return pool(pool_size, name=name)(x)


@keras.saving.register_keras_serializable(package="ranet")
class FusedBatchNormalization(layers.BatchNormalization):
    """Keras' BatchNormalization computed by TensorFlow's fused kernel (FusedBatchNormV3).

    Keras 3 on TensorFlow builds batch norm from ~10 elementwise ops, and at inference
    Grappler cannot fold that into the preceding convolution. The fused op is one kernel
    that Grappler fuses with Conv2D (and ReLU): measured on the 2-core CPU, batch-1 latency
    of the CIFAR RANet -35%, batch-64 inference +25% (BUILD_NOTES.md, "Training speed on
    this CPU"). Same variables, so checkpoints are interchangeable. Its running variance is
    the unbiased batch variance, as PyTorch's (and the reference's) BatchNorm2d keeps.
    Synchronized, masked or non-NHWC inputs take Keras' own path.
    """

    def _fusable(self, inputs, mask) -> bool:
        return (not self.synchronized and not self.renorm and mask is None
                and self.center and self.scale and len(inputs.shape) == 4
                and self.axis in (-1, 3))

    def call(self, inputs, training=None, mask=None):
        if not self._fusable(inputs, mask):
            return super().call(inputs, training=training, mask=mask)
        training = bool(training) and self.trainable
        outputs, mean, variance, *_ = tf.raw_ops.FusedBatchNormV3(
            x=inputs, scale=tf.convert_to_tensor(self.gamma),
            offset=tf.convert_to_tensor(self.beta),
            mean=tf.convert_to_tensor(self.moving_mean),
            variance=tf.convert_to_tensor(self.moving_variance), epsilon=self.epsilon,
            exponential_avg_factor=1.0 - self.momentum if training else 1.0,
            data_format="NHWC", is_training=training)
        if training:
            # With exponential_avg_factor the op returns the updated moving averages.
            self.moving_mean.assign(mean)
            self.moving_variance.assign(variance)
        return outputs


def batch_norm(x, name: str):
    return FusedBatchNormalization(momentum=_BN_MOMENTUM, epsilon=_BN_EPSILON,
                                   synchronized=_SYNC_BATCH_NORM.get(), name=name)(x)


def classifier_dense(x, num_classes: int, name: str):
    """The exit's linear layer, always float32 so logits and softmax are float32."""
    return layers.Dense(num_classes, kernel_initializer=dense_initializer(),
                        bias_initializer=_bias_initializer(x.shape[-1]), dtype="float32",
                        name=name)(x)


@keras.saving.register_keras_serializable(package="ranet")
class BilinearResize(layers.Layer):
    """Bilinear resize with align_corners=True, as the reference's F.interpolate calls.

    Keras' Resizing layer has no align_corners; the TF op does and has a
    gradient and an XLA lowering.
    """

    def __init__(self, size: Tuple[int, int], **kwargs):
        super().__init__(**kwargs)
        self.size = tuple(size)

    def call(self, x):
        resized = tf.raw_ops.ResizeBilinear(images=x, size=self.size, align_corners=True,
                                            half_pixel_centers=False)
        return tf.cast(resized, x.dtype)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], *self.size, input_shape[3])

    def get_config(self):
        return {**super().get_config(), "size": self.size}


def resize_to(x, size: int, name: str):
    """Resizes to size x size; a same-size align_corners resize is the identity, so skip it."""
    if x.shape[1] == size and x.shape[2] == size:
        return x
    return BilinearResize((size, size), name=name)(x)



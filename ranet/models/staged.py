"""The model contract shared by RANet and the baselines: a chain of stages.

Stage k is a functional Keras model that takes the cached features it needs
(a dict of tensors, batch first) and returns the logits of exit k plus the
features that later stages need. Running the stages in order is the full
forward pass; running stage k only for the images still undecided, on the
features cached by stages < k, is real early exit (``ranet.adaptive``).
A baseline is the one-stage case.
"""

import contextlib
import contextvars
import dataclasses
from typing import Dict, List, Sequence, Tuple

import keras
import tensorflow as tf
from keras import layers

IMAGES = "images"
LOGITS = "logits"

# PyTorch's BatchNorm2d defaults (momentum 0.1 there is 0.9 here), as the reference trains.
_BN_MOMENTUM = 0.9
_BN_EPSILON = 1e-5


# One initializer object per layer, made when the layer is: an unseeded Keras initializer
# draws its integer seed from Python's `random` when it is constructed, so constructing it
# at build time (after keras.utils.set_random_seed) makes the weights a function of --seed,
# the same in every process. A single module-level instance would have drawn its seed at
# import (different in every process) and given every kernel of one shape the same values.
def conv_initializer() -> keras.initializers.Initializer:
    """normal(0, sqrt(2 / (k * k * out_channels))): the reference's conv initialisation."""
    return keras.initializers.VarianceScaling(2.0, "fan_out", "untruncated_normal")


def dense_initializer() -> keras.initializers.Initializer:
    """PyTorch's nn.Linear default weight initialisation, uniform(+-1/sqrt(fan_in))."""
    return keras.initializers.VarianceScaling(1.0 / 3.0, "fan_in", "uniform")


@dataclasses.dataclass(frozen=True)
class ExitInfo:
    """Where an exit sits: its 1-based index and the resolution of the features it reads."""
    index: int
    resolution: int
    channels: int


def conv_bn_relu(x, filters: int, kernel_size: int = 3, strides: int = 1, name: str = ""):
    """Conv (no bias) -> BatchNorm -> ReLU, the reference's ConvBasic."""
    x = layers.Conv2D(filters, kernel_size, strides=strides, padding="same", use_bias=False,
                      kernel_initializer=conv_initializer(), name=f"{name}_conv")(x)
    x = batch_norm(x, name=f"{name}_bn")
    return layers.ReLU(name=f"{name}_relu")(x)


# Set around a model build by ``synchronized_batch_norm`` (``ModelConfig.sync_batch_norm``),
# so that every builder's batch norm layers follow it without threading a flag through them.
_SYNC_BATCH_NORM = contextvars.ContextVar("sync_batch_norm", default=False)


@contextlib.contextmanager
def synchronized_batch_norm(enabled: bool):
    """Batch norm layers built inside reduce their statistics over all replicas.

    Under a tf.distribute strategy each replica then normalises with the mean
    and variance of the global batch, so N replicas of batch B/N train like
    one replica of batch B (at the price of three small all-reduces per layer and step).
    Outside ``strategy.run`` and at inference it changes nothing.
    """
    token = _SYNC_BATCH_NORM.set(bool(enabled))
    try:
        yield
    finally:
        _SYNC_BATCH_NORM.reset(token)


@keras.saving.register_keras_serializable(package="ranet")
class FusedBatchNormalization(layers.BatchNormalization):
    """Keras' BatchNormalization computed by TensorFlow's fused kernel (FusedBatchNormV3).

    Keras 3 on TensorFlow builds batch norm from ~10 elementwise ops, and at inference
    Grappler cannot fold that into the preceding convolution. The fused op is one kernel
    that Grappler fuses with Conv2D (and ReLU): measured on the 2-core CPU, batch-1 latency
    of the CIFAR RANet -35%, batch-64 inference +25% (BUILD_NOTES.md, Performance). Same
    variables, so checkpoints are interchangeable. Its running variance is the unbiased
    batch variance, as PyTorch's (and the reference's) BatchNorm2d keeps. Synchronized,
    masked or non-NHWC inputs take Keras' own path.
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
                        bias_initializer="zeros", dtype="float32", name=name)(x)


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


class StageBuilder:
    """Builds the stages of a staged model symbolically, one exit at a time.

    Features that cross a stage boundary are named: ``get(name)`` inside a
    stage returns the tensor if this stage made it, otherwise an input of this
    stage fed from the cache. ``end_stage(logits)`` closes the stage.

    A feature that is a channel prefix of another (dense connectivity makes
    most of them so) is registered with ``put_prefix``: only the larger tensor
    is cached, and a later stage slices it, so early exit gathers far fewer
    tensors per undecided image.
    """

    def __init__(self, image_size: int):
        self._specs = {IMAGES: (image_size, image_size, 3)}
        self._dtypes = {IMAGES: "float32"}
        self._prefix_of = {}
        self._stages = []
        self._new_stage()

    def _new_stage(self):
        self._inputs, self._produced, self._local = {}, {}, {}

    def get(self, name: str):
        if name in self._produced:
            return self._produced[name]
        if name in self._local:
            return self._local[name]
        if name in self._prefix_of:
            source, channels = self._prefix_of[name]
            # ops.slice (tf.Slice), not x[..., :c]: the gradient of a strided slice
            # (StridedSliceGrad) costs ~13 ms per call on a CPU, that of a slice is a Pad.
            source_tensor = self.get(source)
            self._local[name] = keras.ops.slice(
                source_tensor, (0, 0, 0, 0), (-1, *source_tensor.shape[1:3], channels))
            return self._local[name]
        if name not in self._inputs:
            if name not in self._specs:
                raise KeyError(f"feature {name!r} was never produced by an earlier stage")
            self._inputs[name] = keras.Input(self._specs[name], dtype=self._dtypes[name], name=name)
        return self._inputs[name]

    def put(self, name: str, tensor) -> None:
        self._produced[name] = tensor

    def put_prefix(self, name: str, tensor, source: str) -> None:
        """Registers ``tensor``, equal to the first channels of feature ``source``."""
        self._local[name] = tensor
        self._prefix_of[name] = (source, tensor.shape[-1])

    def end_stage(self, logits) -> None:
        self._stages.append((self._inputs, logits, self._produced))
        for name, tensor in self._produced.items():
            self._specs[name] = tuple(tensor.shape[1:])
            self._dtypes[name] = tensor.dtype
        self._new_stage()

    def build(self, name_prefix: str) -> List[keras.Model]:
        """One functional model per stage; outputs only the features a later stage reads."""
        models = []
        for k, (inputs, logits, produced) in enumerate(self._stages):
            needed_later = set().union(*(later[0].keys() for later in self._stages[k + 1:]))
            outputs = {LOGITS: logits}
            outputs.update({n: t for n, t in produced.items() if n in needed_later})
            models.append(keras.Model(inputs, outputs, name=f"{name_prefix}_stage{k + 1}"))
        return models


class StagedClassifier(keras.Model):
    """A classifier with one exit per stage, cheapest first.

    Calling it returns the list of every exit's float32 logits. ``run_stage``
    exposes one stage on cached features for early exit.
    """

    def __init__(self, stages: Sequence[keras.Model], exits: Sequence[ExitInfo], **kwargs):
        super().__init__(**kwargs)
        if len(stages) != len(exits):
            raise ValueError(f"one ExitInfo per stage expected. Received: {len(stages)} stages, "
                             f"{len(exits)} exits")
        # One attribute per stage: Keras 3 wraps list attributes in a TrackedList that
        # tf.train.Checkpoint does not see, so a list of stages would not be saved.
        for k, stage in enumerate(stages, start=1):
            setattr(self, f"stage{k}", stage)
        self._num_stages = len(stages)
        self.exits = tuple(exits)
        self.stage_inputs = [tuple(stage.input.keys()) for stage in self.stages]
        # live_after[k]: features cached by stages <= k that a later stage still reads.
        cached, self.live_after = {IMAGES}, []
        for k, stage in enumerate(self.stages):
            cached |= set(stage.output.keys()) - {LOGITS}
            read_later = set().union(*map(set, self.stage_inputs[k + 1:]))
            self.live_after.append(tuple(sorted(cached & read_later)))

    @property
    def stages(self) -> List[keras.Model]:
        return [getattr(self, f"stage{k}") for k in range(1, self._num_stages + 1)]

    @property
    def num_exits(self) -> int:
        return self._num_stages

    @property
    def num_classes(self) -> int:
        return int(self.stage1.output[LOGITS].shape[-1])

    @property
    def image_shape(self) -> Tuple[int, int, int]:
        return tuple(self.stage1.input[IMAGES].shape[1:])

    @property
    def feature_specs(self) -> Dict[str, tf.TensorSpec]:
        """Shape (batch first, unknown) and dtype of the images and every cached feature."""
        specs = {IMAGES: tf.TensorSpec([None, *self.image_shape], tf.float32)}
        for stage in self.stages:
            specs.update({name: tf.TensorSpec(t.shape, t.dtype)
                          for name, t in stage.output.items() if name != LOGITS})
        return specs

    def run_stage(self, k: int, features: Dict[str, tf.Tensor], training=False):
        """Runs stage k (0-based) on cached features; returns (logits, new features)."""
        outputs = dict(self.stages[k]({n: features[n] for n in self.stage_inputs[k]},
                                      training=training))
        logits = outputs.pop(LOGITS)
        return logits, outputs

    def call(self, images, training=False):
        features, all_logits = {IMAGES: images}, []
        for k in range(self.num_exits):
            logits, new_features = self.run_stage(k, features, training=training)
            all_logits.append(logits)
            features.update(new_features)
        return all_logits

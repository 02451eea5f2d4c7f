"""The model contract shared by RANet and the baselines: a chain of stages.

Stage k is a functional Keras model that takes the cached features it needs
(a dict of tensors, batch first) and returns the logits of exit k plus the
features that later stages need. Running the stages in order is the full
forward pass; running stage k only for the images still undecided, on the
features cached by stages < k, is real early exit (``ranet.inference.adaptive``).
A baseline is the one-stage case.
"""

import dataclasses
import re
from typing import Dict, List, Sequence, Tuple

import keras
import tensorflow as tf

from ranet.models.layers import EXIT_LAYER_PREFIX, in_serving_layout

IMAGES = "images"
LOGITS = "logits"


@dataclasses.dataclass(frozen=True)
class ExitInfo:
    """Where an exit sits: its 1-based index and the resolution of the features it reads."""
    index: int
    resolution: int
    channels: int


class StageBuilder:
    """Builds the stages of a staged model symbolically, one exit at a time.

    Features that cross a stage boundary are named: ``get(name)`` inside a
    stage returns the tensor if this stage made it, otherwise an input of this
    stage fed from the cache. ``end_stage(logits)`` closes the stage.

    A feature that is a channel prefix of another (dense connectivity makes
    most of them so) is registered with ``put_prefix``: only the larger tensor
    is cached, and a later stage slices it, so early exit gathers far fewer
    tensors per undecided image. In the serving layout (``layers.serving_layout``)
    it is an output of its own, as any other feature.
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
        if in_serving_layout():
            self.put(name, tensor)
            return
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

    def exits_up_to(self, images, num_exits: int, training=False):
        """The logits of exits 1..``num_exits``: the stages up to that exit, in order, each
        on the features the earlier ones cached (what early exit computes to reach it)."""
        if not 1 <= num_exits <= self.num_exits:
            raise ValueError(f"num_exits must be in 1..{self.num_exits}. "
                             f"Received: num_exits={num_exits}")
        features, all_logits = {IMAGES: images}, []
        for k in range(num_exits):
            logits, new_features = self.run_stage(k, features, training=training)
            all_logits.append(logits)
            features.update(new_features)
        return all_logits

    def call(self, images, training=False):
        return self.exits_up_to(images, self.num_exits, training=training)


_EXIT_LAYER = re.compile(EXIT_LAYER_PREFIX.format(index=r"\d+"))


def freeze_trunk(model: StagedClassifier) -> None:
    """Leaves only the exits' classifiers trainable; the trunk's batch norm then normalises
    with its moving statistics (FusedBatchNormalization trains only when trainable)."""
    for stage in model.stages:
        for layer in stage.layers:
            layer.trainable = bool(_EXIT_LAYER.match(layer.name))

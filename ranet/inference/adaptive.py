"""Real early exit: run each stage only for the images that have not left yet.

The reference evaluates early exit by SIMULATION: it runs the whole network
and scores the exits afterwards (``simulate`` here). ``AdaptivePredictor``
does it for real, in one compiled graph: stage k runs on the cached features
of the undecided images only, so an image that leaves at exit k costs
stages 1..k and nothing more. Both follow one rule: an image leaves at the
first exit whose confidence is >= that exit's threshold, and the last exit
takes every image still undecided.
"""

import functools
import types
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import tensorflow as tf

from ranet.config import check_choice
from ranet.data.splits import normalize
from ranet.inference import calibration
from ranet.models.staged import IMAGES, StagedClassifier

MAX_SOFTMAX = "max_softmax"
ENTROPY = "entropy"
CONFIDENCE_KINDS = (MAX_SOFTMAX, ENTROPY)


def _check_kind(kind: str) -> None:
    check_choice("confidence", kind, CONFIDENCE_KINDS)


def confidence(probabilities, kind: str = MAX_SOFTMAX):
    """How sure each row of ``probabilities`` [..., C] is; higher is surer for every kind.

    ``max_softmax`` is the largest probability; ``entropy`` is the NEGATIVE
    entropy sum(p log p) (0 for one-hot, -log C for uniform), so that every
    kind exits when confidence >= threshold. A numpy array gives a numpy
    array, computed by the same TensorFlow kernels as a tensor, so that
    simulated and real early exit compare confidences that agree bit for bit.
    """
    _check_kind(kind)
    if isinstance(probabilities, np.ndarray):
        return confidence(tf.constant(probabilities), kind).numpy()
    if kind == MAX_SOFTMAX:
        return tf.reduce_max(probabilities, axis=-1)
    # xlogy gives 0 * log 0 = 0 for classes with probability exactly 0.
    return tf.reduce_sum(tf.math.xlogy(probabilities, probabilities), axis=-1)


def simulate(all_probabilities: np.ndarray, thresholds, kind: str = MAX_SOFTMAX):
    """The reference's simulated early exit on precomputed probabilities.

    Args:
        all_probabilities: [K, N, C] softmax of every exit for every image.
        thresholds: [K]; an image leaves at the first exit k with confidence >= T_k,
            and the last exit takes the rest whatever its threshold.
        kind: one of ``CONFIDENCE_KINDS``.

    Returns:
        (classes int32 [N], exits int32 [N], 1-based).
    """
    all_probabilities = np.asarray(all_probabilities)
    if all_probabilities.ndim != 3:
        raise ValueError("all_probabilities must be [num_exits, num_images, num_classes]. "
                         f"Received: shape={all_probabilities.shape}")
    exits = calibration.exit_indices(confidence(all_probabilities, kind), thresholds)
    chosen = all_probabilities[exits, np.arange(all_probabilities.shape[1])]
    return np.argmax(chosen, axis=-1).astype(np.int32), (exits + 1).astype(np.int32)


def _exit_softmax(model: StagedClassifier):
    """A compiled full forward pass: images [B, H, W, 3] -> softmax of every exit [K, B, C]."""
    @tf.function(input_signature=[model.feature_specs[IMAGES]])
    def forward(images):
        return tf.stack([tf.nn.softmax(logits) for logits in model(images, training=False)])

    return forward


def all_exit_probabilities(model: StagedClassifier, images, batch_size: int = 256) -> np.ndarray:
    """Softmax of every exit for every image, float32 [K, N, C], in input order.

    Args:
        model: a staged classifier.
        images: a float32 array [N, H, W, 3] (normalised as the model was trained), or a
            tf.data.Dataset of such images, or of tuples whose first item is the images,
            batched or not (an unbatched one is batched here). Give it no padding rows.
        batch_size: images per forward pass for an array or an unbatched dataset.
    """
    forward = _exit_softmax(model)
    if isinstance(images, tf.data.Dataset):
        if isinstance(images.element_spec, tuple):
            images = images.map(lambda first, *rest: first)
        if images.element_spec.shape.rank == 3:
            images = images.batch(batch_size)
        chunks = [forward(batch).numpy() for batch in images]
    else:
        images = np.asarray(images, dtype=np.float32)
        chunks = [forward(images[start:start + batch_size]).numpy()
                  for start in range(0, len(images), batch_size)]
    if not chunks:
        raise ValueError("all_exit_probabilities needs at least one image. Received: no images")
    return np.concatenate(chunks, axis=1)


class AdaptivePredictor(tf.Module):
    """Early-exit inference for a staged classifier, compiled and exportable.

    Two ``tf.function``s with input signatures (so ``tf.saved_model.save``
    exports them as they are), each returning ``{"classes": int32 [N],
    "probabilities": float32 [N, C], "exits": int32 [N] (1-based)}``:

    * ``predict_batch(images [N, H, W, 3], thresholds [K])``: stage k runs once
      on the undecided rows only (gathered from the cached features), or not
      at all when none remain;
    * ``predict_one(images [1, H, W, 3], thresholds [K])``: a chain of
      ``tf.cond``s, with no gathering, for batch-1 latency.

    Args:
        model: a ``StagedClassifier``.
        confidence_kind: one of ``CONFIDENCE_KINDS``; thresholds are on this scale.
        count_stage_calls: keep ``stage_calls`` and ``stage_rows`` (int64 [K] variables:
            how many times each stage ran and how many images it processed). Off by
            default; off adds no ops to the graphs.
        jit_compile: XLA-compile ``predict_one``.
        normalization: ``(mean, std)`` of the training split (0..1 units): the images are
            then raw pixels (0..255), normalised inside as training did (``data.normalize``).
            None: the images are normalised already.

    Example:
        >>> predictor = AdaptivePredictor(model)
        >>> out = predictor.predict_batch(images, tf.constant([0.9, 0.8, -np.inf]))
    """

    def __init__(self, model: StagedClassifier, confidence_kind: str = MAX_SOFTMAX,
                 count_stage_calls: bool = False, jit_compile: bool = False,
                 normalization: Optional[Tuple[Sequence[float], Sequence[float]]] = None,
                 name: Optional[str] = None):
        super().__init__(name=name)
        _check_kind(confidence_kind)
        self.model = model
        self.normalization = normalization
        self.confidence_kind = confidence_kind
        self.num_exits = model.num_exits
        self.stage_calls = self.stage_rows = None
        if count_stage_calls:
            self.stage_calls = tf.Variable(tf.zeros([self.num_exits], tf.int64), trainable=False,
                                           name="stage_calls")
            self.stage_rows = tf.Variable(tf.zeros([self.num_exits], tf.int64), trainable=False,
                                          name="stage_rows")
        # Shapes of the empty tensors a skipped stage hands on.
        self._feature_specs = model.feature_specs
        self._num_classes = model.num_classes
        threshold_spec = tf.TensorSpec([self.num_exits], tf.float32)
        self.predict_batch = tf.function(
            self._predict_batch, input_signature=[self._feature_specs[IMAGES], threshold_spec])
        self._one_image_signature = [tf.TensorSpec([1, *model.image_shape], tf.float32),
                                     threshold_spec]
        self._jit_compile = jit_compile
        # XLA fuses the many small ops of a stage, which dominate batch-1 latency; the
        # batched path gathers rows into data-dependent shapes, which XLA cannot compile.
        self.predict_one = tf.function(self._predict_one, jit_compile=jit_compile,
                                       input_signature=self._one_image_signature)
        # Held by a plain object, which tf.Module does not track: a SavedModel of the
        # predictor keeps its two signatures, not every route compiled for timing.
        self._routes = types.SimpleNamespace(compiled={self.num_exits: self.predict_one})

    def predict_one_by_route(self, first: int):
        """``predict_one`` by route ``first`` (1..K): a ``tf.cond`` after each of stages
        1..first-1, then stages first..K in one go and the first sure exit among them. The
        same answers as ``predict_one`` (route K) for every route; which is fastest depends on
        where images leave (``litert_runtime.choose_route``). Compiled once per route."""
        if not 1 <= first <= self.num_exits:
            raise ValueError(f"first must be a stage, 1..{self.num_exits}. Received: {first}")
        compiled = self._routes.compiled
        if first not in compiled:
            compiled[first] = tf.function(
                functools.partial(self._predict_one, first=first),
                jit_compile=self._jit_compile, input_signature=self._one_image_signature)
        return compiled[first]

    def reset_stage_counts(self) -> None:
        """Zeroes ``stage_calls`` and ``stage_rows``."""
        self._require_counters()
        self.stage_calls.assign(tf.zeros_like(self.stage_calls))
        self.stage_rows.assign(tf.zeros_like(self.stage_rows))

    def stage_counts(self) -> Dict[str, np.ndarray]:
        """{"calls": int64 [K], "rows": int64 [K]} since construction or the last reset."""
        self._require_counters()
        return {"calls": self.stage_calls.numpy(), "rows": self.stage_rows.numpy()}

    def _require_counters(self) -> None:
        if self.stage_calls is None:
            raise ValueError("Stage counters are off. Build the predictor with "
                             "AdaptivePredictor(model, count_stage_calls=True). "
                             "Received: count_stage_calls=False")

    def _run_stage(self, k: int, features: Dict[str, tf.Tensor]):
        """Stage k on cached features -> (probabilities, confidences, features live after k)."""
        logits, new_features = self.model.run_stage(k, features, training=False)
        if self.stage_calls is not None:
            one_hot = tf.one_hot(k, self.num_exits, dtype=tf.int64)
            self.stage_calls.assign_add(one_hot)
            self.stage_rows.assign_add(one_hot * tf.shape(logits, out_type=tf.int64)[0])
        probabilities = tf.nn.softmax(logits)
        features = {**features, **new_features}
        live = {name: features[name] for name in self.model.live_after[k]}
        return probabilities, confidence(probabilities, self.confidence_kind), live

    def _inputs(self, images):
        return images if self.normalization is None else normalize(images, *self.normalization)

    def _predict_batch(self, images, thresholds):
        images = self._inputs(images)
        num_images = tf.shape(images)[0]
        num_classes = self._num_classes
        features = {IMAGES: images}
        # The input row of each image still undecided, to put its answer back in place.
        rows = tf.range(num_images)
        decided_rows, decided_probabilities, decided_exits = [], [], []

        for k in range(self.num_exits):
            last = k == self.num_exits - 1

            def run(k=k, last=last, features=features, rows=rows):
                probabilities, confidences, live = self._run_stage(k, features)
                if last:
                    leaves = tf.ones_like(confidences, tf.bool)
                else:
                    leaves = confidences >= thresholds[k]
                stay = tf.where(~leaves)[:, 0]
                leave = tf.where(leaves)[:, 0]
                return (tf.gather(rows, leave), tf.gather(probabilities, leave),
                        tf.gather(rows, stay),
                        {name: tf.gather(value, stay) for name, value in live.items()})

            def skip(k=k):
                empty_rows = tf.zeros([0], tf.int32)
                return (empty_rows, tf.zeros([0, num_classes], tf.float32), empty_rows,
                        {name: tf.zeros([0, *self._feature_specs[name].shape[1:]],
                                        self._feature_specs[name].dtype)
                         for name in self.model.live_after[k]})

            # Stage 1 too: an empty batch runs nothing.
            leave_rows, probabilities, rows, features = tf.cond(tf.size(rows) > 0, run, skip)
            decided_rows.append(leave_rows)
            decided_probabilities.append(probabilities)
            decided_exits.append(tf.fill(tf.shape(leave_rows), k + 1))

        # Every row left at exactly one exit: one scatter puts the answers back in input order.
        indices = tf.concat(decided_rows, axis=0)[:, None]
        probabilities = tf.tensor_scatter_nd_update(
            tf.zeros([num_images, num_classes], tf.float32), indices,
            tf.concat(decided_probabilities, axis=0))
        exits = tf.tensor_scatter_nd_update(tf.zeros([num_images], tf.int32), indices,
                                            tf.concat(decided_exits, axis=0))
        return self._outputs(probabilities, exits)

    def _predict_one(self, image, thresholds, first: Optional[int] = None):
        image = self._inputs(image)
        first = first or self.num_exits

        def from_stage(k, features):
            if k == first - 1:
                return the_rest(k, features)
            probabilities, confidences, live = self._run_stage(k, features)
            return tf.cond(confidences[0] >= thresholds[k],
                           lambda: (probabilities, tf.constant([k + 1], tf.int32)),
                           lambda: from_stage(k + 1, live))

        def the_rest(k, features):
            every, sure = [], []
            for j in range(k, self.num_exits):
                probabilities, confidences, features = self._run_stage(j, features)
                every.append(probabilities[0])
                # The last exit takes every image still undecided.
                sure.append(tf.constant(True) if j == self.num_exits - 1
                            else confidences[0] >= thresholds[j])
            taken = tf.argmax(tf.cast(tf.stack(sure), tf.int32), output_type=tf.int32)
            return tf.gather(tf.stack(every), taken)[None], (k + 1 + taken)[None]

        probabilities, exits = from_stage(0, {IMAGES: image})
        return self._outputs(probabilities, exits)

    @staticmethod
    def _outputs(probabilities, exits):
        return {"classes": tf.argmax(probabilities, axis=-1, output_type=tf.int32),
                "probabilities": probabilities, "exits": exits}

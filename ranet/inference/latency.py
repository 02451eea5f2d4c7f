"""Honest per-image latency and batched throughput, measured the same way for every model.

A *path* is one way of running a model: a callable that takes a float32 batch
[B, H, W, 3] and returns only once its answer is on the host (numpy), so a
timing includes the device sync. ``batch1_paths`` builds them for batch-1
latency: the whole network in one compiled graph (``points.FULL``), real early
exit at each operating point (``AdaptivePredictor.predict_one``), and the seed's
``Model.predict`` as a reference (``points.KERAS_PREDICT``), whose per-call
overhead (data adapter and callbacks rebuilt every call) dwarfs a small CNN's
compute. Paths are keyed by their ``points.PointId``; their names are made there.

``measure_latency`` times every path of every model INTERLEAVED, image by
image, in an order that rotates, so a noisy machine (frequency scaling, other
processes, allocator state) slows all paths alike and their ratios hold.

Example:
    >>> paths = {"ranet": batch1_paths(ranet, AdaptivePredictor(ranet), {points.DEFAULT: t}),
    ...          "vgg16": batch1_paths(vgg16)}
    >>> stats = measure_latency(paths, images[:1000])
    >>> stats["ranet"][points.DEFAULT].p50   # milliseconds
"""

import dataclasses
import time
from typing import Callable, Dict, Hashable, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import tensorflow as tf

from ranet.data import normalize
from ranet.inference import points
from ranet.inference.adaptive import AdaptivePredictor
from ranet.inference.points import PointId
from ranet.inference.serving.litert_runtime import LiteRTPredictor, LiteRTStages, RouteTimings
from ranet.models.staged import StagedClassifier

PathCallable = Callable[[np.ndarray], object]
# (mean, std) of the training split in 0..1 units, for paths that take raw pixels.
Normalization = Tuple[Sequence[float], Sequence[float]]
Thresholds = Mapping[PointId, Sequence[float]]


@dataclasses.dataclass(frozen=True)
class LatencyStats:
    """Percentiles and mean of one path's per-call times, in milliseconds."""
    p50: float
    p90: float
    p99: float
    mean: float
    num_samples: int

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class ExitOverhead:
    """What an adaptive path's machinery costs beyond the exits it computes.

    ``exit_fractions``: the share of the timed images that left at each exit;
    ``expected_ms``: sum_k exit_fractions[k] x mean time of the network up to exit k (in one
    call), what early exit would cost if the hand-offs between stages were free;
    ``overhead``: the path's mean over ``expected_ms`` (1: free hand-offs).
    """
    exit_fractions: Tuple[float, ...]
    expected_ms: float
    overhead: float
    # The switch stage the path ran by (``litert_runtime.choose_route``; K: stage by stage).
    route: Optional[int] = None

    def to_json(self) -> dict:
        return {"exit_fractions": list(self.exit_fractions), "expected_ms": self.expected_ms,
                "overhead": self.overhead, "route": self.route}


def exit_overhead(path: LatencyStats, exit_fractions: Sequence[float],
                  up_to_exit: Sequence[LatencyStats], route: Optional[int] = None
                  ) -> ExitOverhead:
    """``ExitOverhead`` of an adaptive ``path`` whose timed images left at the exits in
    ``exit_fractions`` [K], from the times of the network up to each exit (``up_to_exit``
    [K], the ``points.up_to_exit(k)`` paths timed beside it)."""
    fractions = np.asarray(exit_fractions, np.float64)
    if fractions.shape != (len(up_to_exit),) or not np.isclose(fractions.sum(), 1.0):
        raise ValueError("exit_fractions must be one share per exit, summing to 1. Received: "
                         f"exit_fractions={fractions.tolist()}, {len(up_to_exit)} exits")
    expected = float(fractions @ np.array([stats.mean for stats in up_to_exit]))
    return ExitOverhead(tuple(float(f) for f in fractions), expected, path.mean / expected,
                        route)


def summarize(seconds: Sequence[float]) -> LatencyStats:
    """Per-call times in SECONDS -> ``LatencyStats`` in MILLISECONDS.

    Percentiles use ``np.percentile``'s default linear interpolation between
    the two nearest samples (p90 of [1, 2, 3, 4] is 3.7), so with few samples
    p99 is close to, but not above, the slowest call.
    """
    milliseconds = np.asarray(seconds, dtype=np.float64) * 1e3
    if milliseconds.ndim != 1 or milliseconds.size == 0:
        raise ValueError("summarize needs a non-empty 1-D sequence of per-call times in seconds. "
                         f"Received: shape={milliseconds.shape}")
    p50, p90, p99 = np.percentile(milliseconds, [50, 90, 99])
    return LatencyStats(p50=float(p50), p90=float(p90), p99=float(p99),
                        mean=float(np.mean(milliseconds)), num_samples=int(milliseconds.size))


def _to_host(outputs):
    """Copies every tensor of ``outputs`` to numpy: the wait for the device is part of the call."""
    return tf.nest.map_structure(lambda tensor: tensor.numpy(), outputs)


def _every_exit_classes(model: StagedClassifier, batch_size: Optional[int],
                        jit_compile: bool = False, normalization: Optional[Normalization] = None,
                        num_exits: Optional[int] = None):
    """A compiled forward pass: images [B, H, W, 3] -> int32 [k, B], the class of every exit
    up to ``num_exits`` (default: all of them).

    Fetching every exit's class keeps every exit head in the graph (an unfetched
    head would be pruned away) while handing back only k integers per image.
    ``jit_compile`` and ``normalization`` should match the predictor's, so that full and
    adaptive differ only in which stages run.
    """
    num_exits = num_exits or model.num_exits

    @tf.function(input_signature=[tf.TensorSpec([batch_size, *model.image_shape], tf.float32)],
                 jit_compile=jit_compile)
    def every_exit_classes(images):
        if normalization is not None:
            images = normalize(images, *normalization)
        return tf.stack([tf.argmax(logits, axis=-1, output_type=tf.int32)
                         for logits in model.exits_up_to(images, num_exits, training=False)])

    return every_exit_classes


def _on_host(compiled) -> PathCallable:
    return lambda images: compiled(images).numpy()


def _threshold_tensors(model: StagedClassifier, predictor: Optional[AdaptivePredictor],
                       thresholds: Optional[Thresholds],
                       normalization: Optional[Normalization]) -> Dict[PointId, tf.Tensor]:
    """Validates ``thresholds`` and converts each operating point to a tensor, once."""
    thresholds = dict(thresholds or {})
    if not thresholds:
        return {}
    if predictor is None or predictor.model is not model:
        raise ValueError("Adaptive paths need an AdaptivePredictor built on this same model: "
                         "pass AdaptivePredictor(model). Received: predictor="
                         f"{'None' if predictor is None else 'one built on another model'}")
    if not _same_normalization(predictor.normalization, normalization):
        raise ValueError("The predictor and the paths must take the same inputs: build the "
                         "predictor with the normalization the paths are given.")
    tensors = {}
    for point, values in thresholds.items():
        if not point.is_adaptive:
            raise ValueError("Thresholds are for operating points; the full paths take none. "
                             f"Received: {point.path!r}")
        values = np.asarray(values, dtype=np.float32)
        if values.shape != (model.num_exits,):
            raise ValueError(f"Operating point {point.path!r} needs one threshold per exit "
                             f"({model.num_exits}). Received: thresholds={values.tolist()}")
        tensors[point] = tf.constant(values)
    return tensors


def _same_normalization(first: Optional[Normalization], second: Optional[Normalization]) -> bool:
    if first is None or second is None:
        return first is second
    return all(np.array_equal(a, b) for a, b in zip(first, second))


def _adaptive_path(predict: Callable, thresholds: tf.Tensor) -> PathCallable:
    return lambda images: _to_host(predict(images, thresholds))


def batch1_paths(model: StagedClassifier, predictor: Optional[AdaptivePredictor] = None,
                 thresholds: Optional[Thresholds] = None, jit_compile: bool = False,
                 normalization: Optional[Normalization] = None,
                 routes: Optional[Mapping[PointId, int]] = None) -> Dict[PointId, PathCallable]:
    """The batch-1 latency paths of one model, each taking images [1, H, W, 3] float32.

    Args:
        model: a staged classifier (a baseline is the one-exit case).
        predictor: ``AdaptivePredictor(model)``; needed only when ``thresholds`` is given.
        thresholds: operating point (e.g. ``points.DEFAULT``, ``points.budget(15)``) ->
            one threshold per exit. Empty or None for a baseline.
        jit_compile: XLA-compile the full path (build the predictor with the same).
        normalization: ``(mean, std)``: the images are raw pixels, normalised inside every
            path, as a served request is (build the predictor with the same object).
        routes: operating point -> the route it runs by (``predict_one_by_route``; default
            and absent: stage by stage).

    Returns:
        ``{points.FULL: every stage in one compiled graph, points.up_to_exit(k): the stages
        up to exit k in one compiled graph (a model with several exits, k = 1..K),
        <each operating point>: compiled early exit (tf.cond chain), points.KERAS_PREDICT:
        model.predict(x) as the seed timed it}``. Each returns numpy arrays, only once they
        are on the host.
    """
    def compiled(num_exits=None):
        return _on_host(_every_exit_classes(model, batch_size=1, jit_compile=jit_compile,
                                            normalization=normalization, num_exits=num_exits))

    paths = {points.FULL: compiled()}
    if model.num_exits > 1:
        paths.update({points.up_to_exit(k): compiled(k)
                      for k in range(1, model.num_exits + 1)})
    for point, tensor in _threshold_tensors(model, predictor, thresholds, normalization).items():
        route = (routes or {}).get(point, model.num_exits)
        paths[point] = _adaptive_path(predictor.predict_one_by_route(route), tensor)

    def keras_predict(images):
        if normalization is not None:
            images = normalize(images, *normalization)
        # Already numpy: predict copies its outputs to the host before returning.
        return model.predict(images, verbose=0)

    paths[points.KERAS_PREDICT] = keras_predict
    return paths


def batched_paths(model: StagedClassifier, predictor: Optional[AdaptivePredictor] = None,
                  thresholds: Optional[Thresholds] = None,
                  normalization: Optional[Normalization] = None) -> Dict[PointId, PathCallable]:
    """Throughput paths of one model, each taking images [B, H, W, 3] of any B.

    ``points.FULL`` runs every stage on the whole batch; each operating point runs
    ``predictor.predict_batch`` (stage k on the undecided images only). Both have
    a batch dimension of None in their signature, so a partial last batch does
    not retrace. Arguments as ``batch1_paths``.
    """
    paths = {points.FULL: _on_host(_every_exit_classes(model, batch_size=None,
                                                       normalization=normalization))}
    for point, tensor in _threshold_tensors(model, predictor, thresholds, normalization).items():
        paths[point] = _adaptive_path(predictor.predict_batch, tensor)
    return paths


def litert_paths(stages: LiteRTStages, thresholds: Optional[Thresholds] = None,
                 routes: Optional[Mapping[PointId, int]] = None) -> Dict[PointId, PathCallable]:
    """The paths of a LiteRT export, each taking raw pixels [B, H, W, 3], one image at a time.

    ``points.FULL`` runs every exit (the one-graph file, where the export has it) and returns
    every exit's class (as the TF full path does); ``points.up_to_exit(k)`` exits 1..k (their
    one-graph file; a model with several exits); each operating point is
    ``LiteRTPredictor.predict`` at its thresholds, by its route in ``routes`` (absent:
    stage by stage). Batches are looped image by image: the files have a static batch of 1.
    """
    def up_to(k):
        return lambda images: np.array([stages.exits_up_to(image, k).argmax(-1)
                                        for image in images]).T

    paths = {points.FULL: up_to(stages.num_exits)}
    if stages.num_exits > 1:
        paths.update({points.up_to_exit(k): up_to(k) for k in range(1, stages.num_exits + 1)})
    for point, values in (thresholds or {}).items():
        predictor = LiteRTPredictor(stages, values, route=(routes or {}).get(point))
        paths[point] = lambda images, predictor=predictor: [predictor.predict(image)[:2]
                                                           for image in images]
    return paths


def tensorflow_route_timings(predictor: AdaptivePredictor, image: np.ndarray,
                             rounds: int = 15, warmup: int = 3) -> RouteTimings:
    """What each step of a route costs ``predictor.predict_one_by_route`` here, in the form
    ``litert_runtime.choose_route`` takes (``RouteTimings``).

    Thresholds force where the image leaves: exit k by stage-by-stage early exit (the time to
    leave at k), and no exit before the last by each route (the time of an image that reaches
    the switch stage). Stage k's step is the difference between leaving at k and at k - 1;
    route s's last step the time of reaching s less that of leaving at s - 1. Timed in rounds,
    every setting once per round."""
    num_exits = predictor.num_exits
    never = np.full(num_exits, np.inf, np.float32)
    settings = []
    for k in range(num_exits):
        leave_at_k = never.copy()
        leave_at_k[k] = -np.inf
        settings.append((predictor.predict_one, tf.constant(leave_at_k)))
    settings += [(predictor.predict_one_by_route(first), tf.constant(never))
                 for first in range(1, num_exits)]
    image = tf.constant(np.reshape(image, (1, *predictor.model.image_shape)), tf.float32)
    seconds = np.empty((rounds, len(settings)))
    for round_ in range(-warmup, rounds):
        for column, (predict, thresholds) in enumerate(settings):
            started = time.perf_counter()
            _to_host(predict(image, thresholds))
            seconds[round_, column] = time.perf_counter() - started
    ms = 1e3 * np.median(seconds, axis=0)
    leave_at = ms[:num_exits]
    reach = dict(zip(range(1, num_exits), ms[num_exits:]))
    return RouteTimings({"runtime": "tensorflow"},
                        [float(t) for t in np.diff(leave_at, prepend=0.0)],
                        {first: float(t - (leave_at[first - 2] if first > 1 else 0.0))
                         for first, t in reach.items()})


def _check_images(images) -> np.ndarray:
    images = np.ascontiguousarray(images, dtype=np.float32)
    if images.ndim != 4 or len(images) == 0:
        raise ValueError("images must be a non-empty float32 array [N, H, W, 3]. "
                         f"Received: shape={images.shape}")
    return images


def measure_latency(paths_by_model: Mapping[Hashable, Mapping[Hashable, PathCallable]],
                    images: np.ndarray, warmup: int = 10, clock: Callable[[], float] = time.perf_counter,
                    progress: Optional[Callable[[int, int], None]] = None, block: int = 1
                    ) -> Dict[Hashable, Dict[Hashable, LatencyStats]]:
    """Batch-1 latency of every path of every model, measured interleaved.

    First every path runs on ``warmup`` images, untimed, so tracing, graph
    optimisation and allocator growth happen before timing starts. Then, for each
    block of ``block`` consecutive images, every (model, path) answers the block's
    images one by one (``images[i:i+1]``), each call timed alone with ``clock``. The
    order of the paths rotates by one per block, so no path always runs first after
    the idle gap, or always right after the heaviest one. With ``block`` 1 every call
    finds the caches filled by the other paths (a host serving many models); with a
    larger block most calls find their own weights still cached (a host serving one).

    Args:
        paths_by_model: model -> path's key (a ``PointId``) -> path (``batch1_paths``).
        images: float32 [N, H, W, 3]; N timed calls per path.
        warmup: untimed calls per path before timing (images reused cyclically).
        clock: seconds, monotonic; injectable for tests.
        progress: called as ``progress(images_done, N)`` about every 10% of the images.
        block: images each path answers in a row before the next path runs.

    Returns:
        model -> path's key -> ``LatencyStats`` (milliseconds) over the N images.
    """
    images = _check_images(images)
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0. Received: warmup={warmup}")
    if block < 1:
        raise ValueError(f"block must be >= 1. Received: block={block}")
    calls = [(model_name, path_name, path) for model_name, paths in paths_by_model.items()
             for path_name, path in paths.items()]
    if not calls:
        raise ValueError("measure_latency needs at least one path. "
                         f"Received: paths_by_model={dict(paths_by_model)}")

    def rotated(i: int):
        start = i % len(calls)
        return calls[start:] + calls[:start]

    num_images = len(images)
    for i in range(warmup):
        image = images[i % num_images:i % num_images + 1]
        for _, _, path in rotated(i):
            path(image)

    seconds: Dict[Tuple[Hashable, Hashable], List[float]] = {(m, p): [] for m, p, _ in calls}
    report_every = max(1, num_images // 10)
    for first in range(0, num_images, block):
        end = min(first + block, num_images)
        for model_name, path_name, path in rotated(first // block):
            for i in range(first, end):
                start = clock()
                path(images[i:i + 1])
                seconds[model_name, path_name].append(clock() - start)
        if progress is not None and (end // report_every > first // report_every
                                     or end == num_images):
            progress(end, num_images)

    results: Dict[Hashable, Dict[Hashable, LatencyStats]] = {name: {} for name in paths_by_model}
    for (model_name, path_name), times in seconds.items():
        results[model_name][path_name] = summarize(times)
    return results


def measure_throughput(fn: PathCallable, images: np.ndarray, batch_size: int,
                       warmup_batches: int = 2, clock: Callable[[], float] = time.perf_counter) -> float:
    """Images per second over one timed pass of ``images`` in batches of ``batch_size``.

    The pass covers every image: a last partial batch runs at its own size (no
    padding, so no work on images that are not there is counted), which is why
    ``fn`` should accept any batch size without retracing (``batched_paths`` do).
    Untimed first: ``warmup_batches`` calls on the first batch, and one on the
    partial batch if there is one, so even a shape-specialised ``fn`` traces it
    outside the timed pass. The pass is timed as a whole, batch slicing included.
    """
    images = _check_images(images)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1. Received: batch_size={batch_size}")
    num_images = len(images)
    for _ in range(warmup_batches):
        fn(images[:batch_size])
    remainder = num_images % batch_size
    if remainder and num_images > batch_size:
        fn(images[-remainder:])

    start = clock()
    for offset in range(0, num_images, batch_size):
        fn(images[offset:offset + batch_size])
    elapsed = clock() - start
    if elapsed <= 0:
        raise ValueError("The clock did not advance over the timed pass; use a clock with "
                         f"finer resolution. Received: elapsed={elapsed}")
    return num_images / elapsed

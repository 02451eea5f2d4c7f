"""Latency and throughput measure what they claim: exact stats on a fake clock, untimed
warm-up, rotating interleaved order, and paths that answer like the model they time."""

import json

import keras
import numpy as np
import pytest
import tensorflow as tf

from helpers import TINY_RANET
from ranet import devices
from ranet.config import ModelConfig
from ranet.inference import latency, points
from ranet.inference.points import DEFAULT, FULL, KERAS_PREDICT
from ranet.inference.adaptive import AdaptivePredictor
from ranet.models import get_model

NUM_IMAGES = 20
# An operating point where no image leaves before the last exit.
LAST = points.fixed(2.0)
# The tiny RANet up to each of its 3 exits.
ANYTIME = [points.up_to_exit(k) for k in (1, 2, 3)]


class FakeClock:
    """A clock that only moves when a fake path says it spent time."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _images(num_images: int) -> np.ndarray:
    """Image i is filled with the value i, so a fake path can tell which image it got."""
    return np.broadcast_to(np.arange(num_images, dtype=np.float32)[:, None, None, None],
                           (num_images, 4, 4, 3)).copy()


@pytest.fixture(scope="module")
def ranet():
    keras.utils.set_random_seed(0)
    model = get_model(TINY_RANET)
    assert model.num_exits >= 2
    return model


@pytest.fixture(scope="module")
def vgg16():
    keras.utils.set_random_seed(0)
    return get_model(ModelConfig(name="vgg16", num_classes=10))


@pytest.fixture(scope="module")
def real_images():
    return np.random.default_rng(0).normal(size=(NUM_IMAGES, 32, 32, 3)).astype(np.float32)


def test_summarize_percentiles_linear_interpolation_in_milliseconds():
    stats = latency.summarize([0.004, 0.001, 0.003, 0.002])
    assert stats.p50 == pytest.approx(2.5)
    assert stats.p90 == pytest.approx(3.7)     # 3 + 0.7 * (4 - 3)
    assert stats.p99 == pytest.approx(3.97)
    assert stats.mean == pytest.approx(2.5)
    assert stats.num_samples == 4
    assert json.loads(json.dumps(stats.to_json())).keys() >= {"p50", "p90", "p99", "mean"}


def test_summarize_rejects_no_samples():
    with pytest.raises(ValueError, match="non-empty.*Received: shape"):
        latency.summarize([])


def test_measure_latency_exact_stats_untimed_warmup_rotating_order():
    clock, order, warmup = FakeClock(), [], 3
    calls_per_path = {}

    def fake_path(key, milliseconds_per_image):
        def path(images):
            assert images.shape[0] == 1
            calls_per_path[key] = calls_per_path.get(key, 0) + 1
            order.append(key)
            # Warm-up calls take 1000 s: any of them in the stats would show.
            is_warmup = calls_per_path[key] <= warmup
            image_index = float(images[0, 0, 0, 0])   # float: a float32 clock would round
            clock.now += 1000.0 if is_warmup else milliseconds_per_image * (1 + image_index) / 1e3
        return path

    paths = {"ranet": {"full": fake_path(("ranet", "full"), 2.0),
                       "adaptive": fake_path(("ranet", "adaptive"), 1.0)},
             "vgg16": {"full": fake_path(("vgg16", "full"), 4.0)}}
    progress = []
    num_images = 5
    stats = latency.measure_latency(paths, _images(num_images), warmup=warmup, clock=clock,
                                    progress=lambda done, total: progress.append((done, total)))

    # Image i takes (1 + i) * per-image ms: [1..5] * scale, p50 3, p90 4.6, p99 4.96, mean 3.
    for (model_name, path_name), scale in {("ranet", "full"): 2.0, ("ranet", "adaptive"): 1.0,
                                           ("vgg16", "full"): 4.0}.items():
        got = stats[model_name][path_name]
        assert got.num_samples == num_images
        for field, expected in dict(p50=3.0, p90=4.6, p99=4.96, mean=3.0).items():
            assert getattr(got, field) == pytest.approx(expected * scale, rel=1e-9), field

    keys = list(calls_per_path)
    assert all(count == num_images + warmup for count in calls_per_path.values())
    timed = order[warmup * len(keys):]
    per_image = [timed[i:i + len(keys)] for i in range(0, len(timed), len(keys))]
    assert all(sorted(group) == sorted(keys) for group in per_image)
    firsts = [group[0] for group in per_image]
    assert all(a != b for a, b in zip(firsts, firsts[1:]))
    assert set(firsts) == set(keys)
    assert progress[-1] == (num_images, num_images)


def test_measure_latency_rejects_no_paths():
    with pytest.raises(ValueError, match="at least one path"):
        latency.measure_latency({"ranet": {}}, _images(2))


def test_measure_throughput_fake_clock_counts_every_image_once():
    clock, batch_sizes = FakeClock(), []

    def fn(images):
        batch_sizes.append(len(images))
        clock.now += 0.5

    throughput = latency.measure_throughput(fn, _images(10), batch_size=4, warmup_batches=2,
                                            clock=clock)
    # Warm-up: 2 full batches and the partial one; then the timed pass 4 + 4 + 2 in 1.5 s.
    assert batch_sizes == [4, 4, 2, 4, 4, 2]
    assert throughput == pytest.approx(10 / 1.5, rel=1e-12)


def test_batch1_paths_answer_like_the_model(ranet, real_images):
    predictor = AdaptivePredictor(ranet)
    never = np.full(ranet.num_exits, np.inf, np.float32)
    paths = latency.batch1_paths(ranet, predictor,
                                 {DEFAULT: np.full(ranet.num_exits, -np.inf), LAST: never})
    assert set(paths) == {FULL, DEFAULT, LAST, KERAS_PREDICT, *ANYTIME}
    for i in range(3):
        image = real_images[i:i + 1]
        expected = [np.argmax(logits.numpy(), axis=-1) for logits in ranet(image, training=False)]
        np.testing.assert_array_equal(paths[FULL](image), np.stack(expected))
        for k in range(1, ranet.num_exits + 1):  # up to exit k: exits 1..k, as the full pass
            np.testing.assert_array_equal(paths[points.up_to_exit(k)](image),
                                          np.stack(expected[:k]))
        first = paths[DEFAULT](image)
        assert isinstance(first["classes"], np.ndarray)
        np.testing.assert_array_equal(first["classes"], expected[0])
        np.testing.assert_array_equal(first["exits"], [1])
        last = paths[LAST](image)
        np.testing.assert_array_equal(last["classes"], expected[-1])
        np.testing.assert_array_equal(last["exits"], [ranet.num_exits])
        predicted = paths[KERAS_PREDICT](image)
        assert [np.argmax(logits, axis=-1) for logits in predicted] == expected
    # The thresholds are a tensor made once: predict_one traced once for every call above.
    assert predictor.predict_one.experimental_get_tracing_count() == 1


def test_thresholds_become_one_tensor_not_one_per_call(ranet, real_images):
    predictor = AdaptivePredictor(ranet)
    received, predict_one = [], predictor.predict_one

    def spy(images, thresholds):
        received.append(thresholds)
        return predict_one(images, thresholds)

    predictor.predict_one = spy
    path = latency.batch1_paths(ranet, predictor, {DEFAULT: [0.5] * ranet.num_exits})[DEFAULT]
    for i in range(4):
        path(real_images[i:i + 1])
    assert all(isinstance(t, tf.Tensor) and t is received[0] for t in received)


def test_batch1_paths_of_a_baseline(vgg16, real_images):
    paths = latency.batch1_paths(vgg16)
    assert set(paths) == {FULL, KERAS_PREDICT}
    image = real_images[:1]
    expected = np.argmax(vgg16(image, training=False)[0].numpy(), axis=-1)
    np.testing.assert_array_equal(paths[FULL](image), [expected])
    np.testing.assert_array_equal(np.argmax(paths[KERAS_PREDICT](image)[0], axis=-1), expected)


@pytest.mark.parametrize("predictor_kind, thresholds, match", [
    ("none", {DEFAULT: [0.5, 0.5]}, "AdaptivePredictor built on this same model"),
    ("own", {FULL: [0.5, 0.5]}, "the full paths take none.*Received: 'full'"),
    ("own", {DEFAULT: [0.5]}, r"one threshold per exit.*Received: thresholds=\[0.5\]"),
])
def test_batch1_paths_rejects_bad_operating_points(ranet, predictor_kind, thresholds, match):
    predictor = AdaptivePredictor(ranet) if predictor_kind == "own" else None
    with pytest.raises(ValueError, match=match):
        latency.batch1_paths(ranet, predictor, thresholds)


def test_batched_paths_and_real_throughput(ranet, real_images):
    predictor = AdaptivePredictor(ranet)
    paths = latency.batched_paths(ranet, predictor, {DEFAULT: [0.5] * ranet.num_exits})
    assert set(paths) == {FULL, DEFAULT}
    full = paths[FULL](real_images[:7])
    assert full.shape == (ranet.num_exits, 7)
    assert paths[DEFAULT](real_images[:7])["classes"].shape == (7,)
    for path in paths.values():
        assert latency.measure_throughput(path, real_images, batch_size=8) > 0
    # Batches of 8, 8, 4 and the warm-up share one trace: no retracing for the last batch.
    assert predictor.predict_batch.experimental_get_tracing_count() == 1


def test_real_latency_end_to_end(ranet, vgg16, real_images):
    predictor = AdaptivePredictor(ranet)
    paths = {"ranet": latency.batch1_paths(ranet, predictor,
                                           {DEFAULT: [0.5] * ranet.num_exits}),
             "vgg16": latency.batch1_paths(vgg16)}
    stats = latency.measure_latency(paths, real_images, warmup=2)
    assert {name: set(by_path) for name, by_path in stats.items()} == {
        "ranet": {FULL, DEFAULT, KERAS_PREDICT, *ANYTIME}, "vgg16": {FULL, KERAS_PREDICT}}
    for by_path in stats.values():
        for got in by_path.values():
            assert got.num_samples == NUM_IMAGES
            assert 0 < got.p50 <= got.p90 <= got.p99
            assert got.mean > 0


def test_device_info_describes_this_machine():
    info = devices.device_info()
    assert info["device"].startswith("CPU: ") and "cores" in info["device"]
    assert info["tensorflow"] == tf.__version__ and info["keras"] == keras.__version__
    assert info["intra_op_threads"] >= 0 and info["inter_op_threads"] >= 0
    assert info["cpu_count"] >= 1
    json.dumps(info)


def test_measure_latency_in_blocks_runs_each_path_on_consecutive_images():
    clock, order = FakeClock(), []

    def fake_path(name, milliseconds_per_image):
        def path(images):
            order.append((name, int(images[0, 0, 0, 0])))
            clock.now += milliseconds_per_image * (1 + float(images[0, 0, 0, 0])) / 1e3
        return path

    paths = {"ranet": {"adaptive": fake_path("a", 1.0)}, "vgg16": {"full": fake_path("v", 4.0)}}
    stats = latency.measure_latency(paths, _images(5), warmup=0, clock=clock, block=2)
    # Blocks [0, 1], [2, 3], [4]; the path that goes first alternates per block.
    assert order == [("a", 0), ("a", 1), ("v", 0), ("v", 1), ("v", 2), ("v", 3), ("a", 2),
                     ("a", 3), ("a", 4), ("v", 4)]
    assert stats["ranet"]["adaptive"].p50 == pytest.approx(3.0)
    assert stats["vgg16"]["full"].mean == pytest.approx(12.0)
    with pytest.raises(ValueError, match="block must be >= 1"):
        latency.measure_latency(paths, _images(2), block=0)


def test_the_overhead_of_an_adaptive_path_by_hand():
    """A quarter of the images leave at exit 1 (1 ms up to there), the rest at exit 2 (3 ms):
    free hand-offs would take 0.25 x 1 + 0.75 x 3 = 2.5 ms; the path's mean 2.75 is 1.1x."""
    def stats(mean):
        return latency.LatencyStats(p50=mean, p90=mean, p99=mean, mean=mean, num_samples=4)

    overhead = latency.exit_overhead(stats(2.75), [0.25, 0.75], [stats(1.0), stats(3.0)])
    assert overhead.exit_fractions == (0.25, 0.75)
    assert overhead.expected_ms == pytest.approx(2.5)
    assert overhead.overhead == pytest.approx(1.1)
    with pytest.raises(ValueError, match="one share per exit, summing to 1"):
        latency.exit_overhead(stats(1.0), [0.5, 0.4], [stats(1.0), stats(3.0)])

"""Real early exit equals the simulated protocol, image for image, and never recomputes a stage."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from helpers import TINY_RANET
from ranet.config import ModelConfig
from ranet.inference import adaptive, calibration
from ranet.models import get_model

NUM_IMAGES = 64
CALIBRATED_QS = (0.25, 1.0, 1.75)


@pytest.fixture(scope="module")
def model():
    keras.utils.set_random_seed(0)
    built = get_model(TINY_RANET)
    assert built.num_exits == 3
    return built


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(0).normal(size=(NUM_IMAGES, 32, 32, 3)).astype(np.float32)


@pytest.fixture(scope="module")
def probabilities(model, images):
    # Batches of 16: a different batching from predict_batch's, on purpose.
    return adaptive.all_exit_probabilities(model, images, batch_size=16)


@pytest.fixture(scope="module")
def predictor(model):
    return adaptive.AdaptivePredictor(model, count_stage_calls=True)


def _thresholds(case, probabilities, kind=adaptive.MAX_SOFTMAX):
    """float32 [K] thresholds: calibrated at q (thresholds equal to observed confidences,
    the tie edge case), or degenerate."""
    num_exits = probabilities.shape[0]
    if case == "all_leave_at_1":
        return np.full(num_exits, -np.inf, np.float32)
    if case == "none_leave_early":
        return np.full(num_exits, np.inf, np.float32)
    confidences = adaptive.confidence(probabilities, kind)
    return calibration.thresholds_for_distribution(confidences, calibration.exit_distribution(case, num_exits)
                                 ).astype(np.float32)


def _assert_matches(outputs, probabilities, thresholds, kind=adaptive.MAX_SOFTMAX):
    """Real early exit outputs == simulate on the full forward pass, image for image."""
    classes, exits = adaptive.simulate(probabilities, thresholds, kind)
    np.testing.assert_array_equal(np.asarray(outputs["exits"]), exits)
    np.testing.assert_array_equal(np.asarray(outputs["classes"]), classes)
    chosen = probabilities[exits - 1, np.arange(len(exits))]
    np.testing.assert_allclose(np.asarray(outputs["probabilities"]), chosen, atol=1e-6)
    return exits


def _predict_each(predictor, images, thresholds):
    """predict_one image by image, stacked like predict_batch's outputs."""
    outputs = [predictor.predict_one(images[i:i + 1], thresholds) for i in range(len(images))]
    return {key: np.concatenate([o[key].numpy() for o in outputs]) for key in outputs[0]}


def _reached(exits, num_exits):
    """How many images each stage must process: those whose exit is >= k."""
    return np.array([(exits >= k).sum() for k in range(1, num_exits + 1)])


CASES = [*CALIBRATED_QS, "all_leave_at_1", "none_leave_early"]


@pytest.mark.parametrize("case", CASES)
def test_predict_batch_equals_simulate_and_runs_each_stage_once(predictor, images,
                                                                probabilities, case):
    thresholds = _thresholds(case, probabilities)
    predictor.reset_stage_counts()
    exits = _assert_matches(predictor.predict_batch(images, thresholds), probabilities, thresholds)
    reached = _reached(exits, predictor.num_exits)
    counts = predictor.stage_counts()
    # Once per call, or never when no image got that far; and only the images still undecided.
    np.testing.assert_array_equal(counts["calls"], (reached > 0).astype(int))
    np.testing.assert_array_equal(counts["rows"], reached)
    if case == "all_leave_at_1":
        np.testing.assert_array_equal(counts["calls"], [1, 0, 0])
    elif case == "none_leave_early":
        assert (exits == predictor.num_exits).all()
        np.testing.assert_array_equal(counts["rows"], [NUM_IMAGES] * 3)
    else:
        # Calibration at these q gives a real mix: every exit is used.
        assert len(np.unique(exits)) == 3


@pytest.mark.parametrize("case", CASES)
def test_predict_one_equals_simulate(predictor, images, probabilities, case):
    thresholds = _thresholds(case, probabilities)
    predictor.reset_stage_counts()
    exits = _assert_matches(_predict_each(predictor, images, thresholds), probabilities,
                            thresholds)
    counts = predictor.stage_counts()
    # One image per call: stage k ran once for every image that reached it, and only for those.
    np.testing.assert_array_equal(counts["rows"], _reached(exits, predictor.num_exits))
    np.testing.assert_array_equal(counts["calls"], counts["rows"])


@pytest.mark.parametrize("case", [CALIBRATED_QS[0], CALIBRATED_QS[-1], "none_leave_early"])
def test_every_route_answers_as_stage_by_stage(model, images, probabilities, case):
    predictor = adaptive.AdaptivePredictor(model)
    thresholds = tf.constant(_thresholds(case, probabilities))
    reference = [predictor.predict_one(images[i:i + 1], thresholds) for i in range(16)]
    for first in range(1, predictor.num_exits):
        route = predictor.predict_one_by_route(first)
        for i, expected in enumerate(reference):
            answer = route(images[i:i + 1], thresholds)
            for key in ("classes", "exits"):
                np.testing.assert_array_equal(answer[key], expected[key], err_msg=(first, i))
            np.testing.assert_allclose(answer["probabilities"], expected["probabilities"],
                                       rtol=1e-6, atol=1e-7)
    assert predictor.predict_one_by_route(predictor.num_exits) is predictor.predict_one
    with pytest.raises(ValueError, match="first must be a stage"):
        predictor.predict_one_by_route(0)


def test_tensorflow_route_timings_take_apart_the_steps(model, monkeypatch):
    from ranet.inference import latency
    predictor = adaptive.AdaptivePredictor(model)
    # A clock that advances by the cost each call is made to have: leaving at exit k costs
    # 1, 3, 6 ms (steps 1, 2, 3); reaching the end by route 1 costs 5, by route 2 costs 4.
    costs = iter([1, 3, 6, 5, 4] * 2)
    clock = {"now": 0.0, "cost": 0.0}

    def perf_counter():
        clock["now"] += clock["cost"]
        clock["cost"] = 0.0
        return clock["now"]

    def timed(function):
        def call(image, thresholds):
            clock["cost"] = next(costs) / 1e3
            return function(image, thresholds)
        return call

    predictor.predict_one = timed(predictor.predict_one)
    routes = {first: timed(predictor.predict_one_by_route(first)) for first in (1, 2)}
    predictor.predict_one_by_route = routes.get
    monkeypatch.setattr(latency.time, "perf_counter", perf_counter)
    timings = latency.tensorflow_route_timings(predictor, np.zeros((32, 32, 3), np.float32),
                                               rounds=1, warmup=1)
    np.testing.assert_allclose(timings.stage_ms, [1.0, 2.0, 3.0])
    assert timings.from_stage_ms == pytest.approx({1: 5.0, 2: 4.0 - 1.0})


def test_entropy_confidence_agrees_with_simulate(model, images, probabilities):
    predictor = adaptive.AdaptivePredictor(model, confidence_kind=adaptive.ENTROPY)
    thresholds = _thresholds(1.0, probabilities, adaptive.ENTROPY)
    exits = _assert_matches(predictor.predict_batch(images, thresholds), probabilities,
                            thresholds, adaptive.ENTROPY)
    assert len(np.unique(exits)) >= 3
    _assert_matches(_predict_each(predictor, images[:16], thresholds), probabilities[:, :16],
                    thresholds, adaptive.ENTROPY)


def test_confidence_kinds():
    probabilities = np.array([[1.0, 0.0, 0.0], [1 / 3, 1 / 3, 1 / 3]], np.float32)
    np.testing.assert_allclose(adaptive.confidence(probabilities), [1.0, 1 / 3])
    np.testing.assert_allclose(adaptive.confidence(probabilities, adaptive.ENTROPY),
                               [0.0, -np.log(3)], rtol=1e-6)
    tensor = adaptive.confidence(tf.constant(probabilities), adaptive.ENTROPY)
    assert isinstance(tensor, tf.Tensor)
    with pytest.raises(ValueError, match=r"confidence must be one of max_softmax, entropy.*"
                                         r"Received: confidence='margin'"):
        adaptive.confidence(probabilities, "margin")


def _graph_ops(function) -> set:
    graph_def = function.get_concrete_function().graph.as_graph_def()
    # Stage bodies live in the tf.cond branch functions of the graph's library.
    ops = {node.op for node in graph_def.node}
    return ops | {node.op for f in graph_def.library.function for node in f.node_def}


def test_counters_off_add_no_ops(model, predictor):
    assert "AssignAddVariableOp" in _graph_ops(predictor.predict_batch)  # The check can fail.
    plain = adaptive.AdaptivePredictor(model)
    for function in (plain.predict_batch, plain.predict_one):
        assert "AssignAddVariableOp" not in _graph_ops(function)
    with pytest.raises(ValueError, match="count_stage_calls=True"):
        plain.stage_counts()


def test_all_exit_probabilities_from_a_dataset(model, images, probabilities):
    labels = np.zeros(NUM_IMAGES, np.int32)
    unbatched = tf.data.Dataset.from_tensor_slices((images, labels))
    np.testing.assert_allclose(adaptive.all_exit_probabilities(model, unbatched, batch_size=32),
                               probabilities, atol=1e-6)
    batched = tf.data.Dataset.from_tensor_slices(images).batch(10)
    np.testing.assert_allclose(adaptive.all_exit_probabilities(model, batched), probabilities,
                               atol=1e-6)


def test_one_exit_baseline():
    keras.utils.set_random_seed(0)
    baseline = get_model(ModelConfig(name="vgg16", num_classes=10))
    assert baseline.num_exits == 1
    images = np.random.default_rng(1).normal(size=(8, 32, 32, 3)).astype(np.float32)
    probabilities = adaptive.all_exit_probabilities(baseline, images)
    predictor = adaptive.AdaptivePredictor(baseline, count_stage_calls=True)
    # The only exit is the last one: it takes every image, whatever its threshold.
    thresholds = np.array([np.inf], np.float32)
    exits = _assert_matches(predictor.predict_batch(images, thresholds), probabilities, thresholds)
    assert (exits == 1).all()
    _assert_matches(_predict_each(predictor, images[:2], thresholds), probabilities[:, :2],
                    thresholds)
    np.testing.assert_array_equal(predictor.stage_counts()["calls"], [3])


@pytest.mark.slow
def test_saved_model_round_trip(predictor, images, probabilities, tmp_path):
    thresholds = _thresholds(1.0, probabilities)
    tf.saved_model.save(predictor, str(tmp_path))
    restored = tf.saved_model.load(str(tmp_path))
    _assert_matches(restored.predict_batch(images, thresholds), probabilities, thresholds)
    _assert_matches(_predict_each(restored, images[:4], thresholds), probabilities[:, :4],
                    thresholds)
    # A route compiled before saving stays out of the SavedModel.
    predictor.predict_one_by_route(1)
    tf.saved_model.save(predictor, str(tmp_path / "with_a_route"))
    assert not hasattr(tf.saved_model.load(str(tmp_path / "with_a_route")), "_routes")


def test_xla_compiled_predict_one_equals_simulate(model, images, probabilities):
    # Medians of an even number of confidences sit between two images' values, so XLA's
    # last-bit differences cannot move an image across a threshold.
    confidences = np.asarray(adaptive.confidence(probabilities))
    thresholds = np.median(confidences[:, :64], axis=1).astype(np.float32)
    thresholds[-1] = -np.inf
    compiled = adaptive.AdaptivePredictor(model, jit_compile=True)
    outputs = _predict_each(compiled, images[:64], thresholds)
    classes, exits = adaptive.simulate(probabilities[:, :64], thresholds)
    np.testing.assert_array_equal(np.asarray(outputs["exits"]), exits)
    np.testing.assert_array_equal(np.asarray(outputs["classes"]), classes)
    assert len(set(exits)) > 1

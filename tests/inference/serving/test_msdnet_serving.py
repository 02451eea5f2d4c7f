"""MSDNet goes where RANet goes: a SavedModel whose early exit is the in-process one, and
LiteRT stage files, fp32 and int8, wholly on XNNPACK, whose early-exit answers are
TensorFlow's with the same thresholds. Slow: an int8 conversion and a SavedModel."""

import numpy as np
import pytest
import tensorflow as tf

from helpers import SYNTHETIC_DATA, TINY_MSDNET, write_model_dir
from inference.serving.test_litert import (_decisions_match_tensorflow, _tf_logits,
                                           _every_route_answers_as_stage_by_stage)
from inference.serving.test_saved_model import _assert_same_answers, _in_process
from ranet import data
from ranet.inference import adaptive, calibration
from ranet.inference.serving import litert, litert_runtime, saved_model
from ranet.inference.serving.exporting import ExportOptions

pytestmark = pytest.mark.slow
NUM_EXITS = 3


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("msdnet")
    # PyTorch's initialisation leaves smaller logits than He-normal: sharpen them more, so
    # that confidences spread rather than tie.
    return directory, write_model_dir(directory, TINY_MSDNET, logit_scale=30.0)


@pytest.fixture(scope="module")
def splits():
    return data.load_splits(SYNTHETIC_DATA)


def test_saved_model_serves_the_in_process_early_exit(model_dir, splits, tmp_path):
    directory, model = model_dir
    metadata = saved_model.export(ExportOptions(model_dir=str(directory),
                                                export_dir=str(tmp_path / "serving" / "1")))
    loaded = tf.saved_model.load(str(tmp_path / "serving" / "1"))
    assert metadata["num_exits"] == NUM_EXITS
    raw_images = splits.test.images.astype(np.float32)
    thresholds = [float(t) for t in metadata["thresholds"]]
    predictor = adaptive.AdaptivePredictor(model)
    _assert_same_answers(loaded.signatures["serving_default"](images=tf.constant(raw_images)),
                         _in_process(predictor, raw_images, splits, thresholds))
    logits = loaded.signatures["all_exits"](images=tf.constant(raw_images[:8]))
    np.testing.assert_allclose(
        np.stack([logits[f"logits_exit_{k}"].numpy() for k in range(1, NUM_EXITS + 1)]),
        _tf_logits(model, raw_images[:8], splits), rtol=1e-4, atol=1e-4)


def test_litert_stages_run_on_xnnpack_and_decide_as_tensorflow(model_dir, splits, tmp_path):
    directory, model = model_dir
    litert.export(ExportOptions(model_dir=str(directory), export_dir=str(tmp_path / "export"),
                                format="litert", representative_images=64))
    stages = {precision: litert_runtime.LiteRTStages(str(tmp_path / "export"), precision,
                                                     num_threads=2)
              for precision in ("fp32", "int8")}
    for precision, staged in stages.items():
        assert staged.num_exits == NUM_EXITS
        for k, interpreter in enumerate(staged.interpreters, start=1):
            ops = [op["op_name"] for op in interpreter._get_ops_details()]
            assert ops.count("DELEGATE") == 1, (precision, k, ops)
    pixels = splits.test.images[:48]
    np.testing.assert_allclose(stages["fp32"].all_exit_logits(pixels[:24]),
                               _tf_logits(model, pixels[:24], splits), rtol=1e-4, atol=1e-4)
    agreement = (stages["int8"].all_exit_logits(pixels).argmax(-1)
                 == stages["fp32"].all_exit_logits(pixels).argmax(-1)).mean(axis=1)
    assert np.all(agreement >= 0.9), agreement
    # Thresholds calibrated on other images, so that no confidence compared equals one.
    calibration_pixels = splits.test.images[48:240]
    probabilities = adaptive.all_exit_probabilities(
        model, data.normalize(calibration_pixels, splits.mean, splits.std))
    for q in (0.5, 1.5):
        thresholds = calibration.thresholds_for_distribution(
            adaptive.confidence(probabilities), calibration.exit_distribution(q, NUM_EXITS))
        ties = _decisions_match_tensorflow(model, stages["fp32"], pixels, splits.mean,
                                           splits.std, thresholds)
        assert ties <= 2, (q, ties)
        # Every route answers as stage by stage, on either precision's files.
        for precision, staged in stages.items():
            assert staged.routes == [1, 2, 3]
            _every_route_answers_as_stage_by_stage(staged, pixels, thresholds)


def test_every_tensorflow_route_answers_as_stage_by_stage(model_dir, splits):
    _, model = model_dir
    predictor = adaptive.AdaptivePredictor(model)
    images = data.normalize(splits.test.images[:24], splits.mean, splits.std)
    probabilities = adaptive.all_exit_probabilities(model, images)
    thresholds = tf.constant(calibration.thresholds_for_distribution(
        adaptive.confidence(probabilities), calibration.exit_distribution(1.0, NUM_EXITS)),
        tf.float32)
    reference = [predictor.predict_one(images[i:i + 1], thresholds) for i in range(24)]
    assert len({int(r["exits"][0]) for r in reference}) > 1
    for first in (1, 2):
        route = predictor.predict_one_by_route(first)
        for i, expected in enumerate(reference):
            answer = route(images[i:i + 1], thresholds)
            assert int(answer["exits"][0]) == int(expected["exits"][0]), (first, i)
            assert int(answer["classes"][0]) == int(expected["classes"][0]), (first, i)
            np.testing.assert_allclose(answer["probabilities"], expected["probabilities"],
                                       rtol=1e-6, atol=1e-7)

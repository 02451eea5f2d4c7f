"""The serving SavedModel answers as the in-process model does, and is written atomically.

The model directory is made without training: the tiny 3-exit RANet with its exit layers
sharpened so that confidences spread, a config.json and one checkpoint.
"""

import json
import os

import numpy as np
import pytest
import tensorflow as tf

from helpers import SYNTHETIC_DATA as DATA
from helpers import write_model_dir
from ranet import costs, data
from ranet.config import ModelConfig
from ranet.inference import adaptive
from ranet.inference.serving import saved_model
from ranet.inference.serving.exporting import ExportOptions

NUM_EXITS = 3


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("run")
    return directory, write_model_dir(directory, logit_scale=6.0)


@pytest.fixture(scope="module")
def exported(model_dir, tmp_path_factory):
    """The default operating point exported in-process, over a stale export (--overwrite)."""
    directory, model = model_dir
    export_dir = tmp_path_factory.mktemp("serving") / "ranet" / "1"
    export_dir.mkdir(parents=True)
    (export_dir / "stale.txt").write_text("from an older export")
    metadata = saved_model.export(ExportOptions(model_dir=str(directory),
                                                export_dir=str(export_dir), overwrite=True))
    return export_dir, metadata, model


@pytest.fixture(scope="module")
def loaded(exported):
    return tf.saved_model.load(str(exported[0]))


@pytest.fixture(scope="module")
def splits():
    return data.load_splits(DATA)


@pytest.fixture(scope="module")
def raw_images(splits):
    """Test-split pixels (not the calibration images, so no confidence ties a threshold)."""
    return splits.test.images.astype(np.float32)


@pytest.fixture(scope="module")
def predictor(exported):
    return adaptive.AdaptivePredictor(exported[2])


def _in_process(predictor, raw_images, splits, thresholds):
    return predictor.predict_batch(data.normalize(raw_images, splits.mean, splits.std),
                                   tf.constant(thresholds, tf.float32))


def _assert_same_answers(served, expected):
    np.testing.assert_array_equal(served["exits"].numpy(), expected["exits"].numpy())
    np.testing.assert_array_equal(served["classes"].numpy(), expected["classes"].numpy())
    # The served graph normalises in TensorFlow and is optimised separately (oneDNN and
    # grappler fuse differently), so float32 sums differ in the last bits; sharpened
    # logits (x6) amplify that to ~6e-6 in the probabilities.
    np.testing.assert_allclose(served["probabilities"].numpy(),
                               expected["probabilities"].numpy(), rtol=1e-4, atol=2e-5)


def test_export_replaces_the_stale_folder_and_leaves_no_staging_behind(exported):
    export_dir, _, _ = exported
    assert (export_dir / "saved_model.pb").is_file()
    assert (export_dir / "assets.extra" / saved_model.METADATA_FILENAME).is_file()
    assert not (export_dir / "stale.txt").exists()
    assert sorted(os.listdir(export_dir.parent)) == ["1"]


def test_metadata_records_the_operating_point_and_normalisation(exported, splits):
    export_dir, metadata, model = exported
    with open(export_dir / "assets.extra" / saved_model.METADATA_FILENAME) as f:
        written = json.load(f)
    assert written == metadata
    assert len(written["thresholds"]) == NUM_EXITS and written["thresholds"][-1] == "-inf"
    assert written["operating_point"]["rule"] == "default"
    assert written["operating_point"]["num_images"] == DATA.validation_size
    assert written["exit_macs"] == [e.macs for e in costs.count(model).exits]
    assert written["num_classes"] == 10 and written["num_exits"] == NUM_EXITS
    np.testing.assert_array_equal(written["normalization"]["mean"], splits.mean)
    np.testing.assert_array_equal(written["normalization"]["std"], splits.std)
    assert written["checkpoint"].endswith("ckpt-1")
    assert written["tensorflow_version"] == tf.__version__


def test_signatures_and_their_specs(loaded):
    assert set(loaded.signatures) == set(saved_model.SIGNATURE_NAMES)
    images = tf.TensorSpec([None, 32, 32, 3], tf.float32, name="images")
    thresholds = tf.TensorSpec([NUM_EXITS], tf.float32, name="thresholds")
    answers = {"classes": tf.TensorSpec([None], tf.int32, name="classes"),
               "probabilities": tf.TensorSpec([None, 10], tf.float32, name="probabilities"),
               "exits": tf.TensorSpec([None], tf.int32, name="exits")}
    expected = {
        "serving_default": ({"images": images}, answers),
        "adaptive": ({"images": images, "thresholds": thresholds}, answers),
        "all_exits": ({"images": images},
                      {f"logits_exit_{k}": tf.TensorSpec([None, 10], tf.float32,
                                                         name=f"logits_exit_{k}")
                       for k in range(1, NUM_EXITS + 1)}),
    }
    for name, (inputs, outputs) in expected.items():
        signature = loaded.signatures[name]
        assert signature.structured_input_signature == ((), inputs), name
        assert signature.structured_outputs == outputs, name


def test_serving_default_is_the_in_process_early_exit(exported, loaded, predictor, raw_images,
                                                     splits):
    metadata = exported[1]
    thresholds = [float(t) for t in metadata["thresholds"]]
    np.testing.assert_array_equal(loaded.thresholds.numpy(), np.float32(thresholds))
    served = loaded.signatures["serving_default"](images=tf.constant(raw_images))
    _assert_same_answers(served, _in_process(predictor, raw_images, splits, thresholds))


@pytest.mark.parametrize("case", ["all_leave_at_1", "none_leave_early", "mixed"])
def test_adaptive_takes_thresholds_per_call(case, exported, loaded, predictor, raw_images,
                                            splits):
    if case == "mixed":
        # Median confidences of exits 1 and 2: images leave at every exit.
        probabilities = adaptive.all_exit_probabilities(
            exported[2], data.normalize(raw_images, splits.mean, splits.std))
        thresholds = list(np.median(probabilities.max(axis=-1), axis=1)[:-1]) + [-np.inf]
    else:
        value = -np.inf if case == "all_leave_at_1" else np.inf
        thresholds = [value] * NUM_EXITS
    served = loaded.signatures["adaptive"](images=tf.constant(raw_images),
                                           thresholds=tf.constant(thresholds, tf.float32))
    _assert_same_answers(served, _in_process(predictor, raw_images, splits, thresholds))
    expected_exits = {"all_leave_at_1": {1}, "none_leave_early": {NUM_EXITS},
                      "mixed": {1, 2, 3}}[case]
    assert set(served["exits"].numpy()) == expected_exits


def test_the_thresholds_variable_steers_serving_default(loaded, raw_images):
    stored = loaded.thresholds.numpy()
    try:
        loaded.thresholds.assign(np.full(NUM_EXITS, np.inf, np.float32))
        served = loaded.signatures["serving_default"](images=tf.constant(raw_images))
        assert set(served["exits"].numpy()) == {NUM_EXITS}
    finally:
        loaded.thresholds.assign(stored)


def test_all_exits_are_the_model_logits(exported, loaded, raw_images, splits):
    model = exported[2]
    served = loaded.signatures["all_exits"](images=tf.constant(raw_images))
    expected = model(data.normalize(raw_images, splits.mean, splits.std), training=False)
    assert sorted(served) == [f"logits_exit_{k}" for k in range(1, NUM_EXITS + 1)]
    for k, logits in enumerate(expected, start=1):
        # The serving graph lets Grappler fold batch norm into the convolutions, so it rounds
        # differently from the eager call: agreement to float32 precision of the largest logit.
        np.testing.assert_allclose(served[f"logits_exit_{k}"].numpy(), logits.numpy(),
                                   rtol=1e-5, atol=2e-6 * float(np.abs(logits).max()))


def test_wrong_number_of_thresholds_is_refused(exported, splits):
    with pytest.raises(ValueError, match=r"one value per exit \(3\).*Received: thresholds"):
        saved_model.build_serving_module(exported[2], [0.5, -np.inf], splits.mean, splits.std)


def test_a_failed_save_keeps_the_old_export(model_dir, tmp_path, monkeypatch):
    export_dir = tmp_path / "1"
    export_dir.mkdir()
    (export_dir / "old.txt").write_text("previous version")

    def failing_save(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(tf.saved_model, "save", failing_save)
    with pytest.raises(RuntimeError, match="disk full"):
        saved_model.export(ExportOptions(model_dir=str(model_dir[0]), export_dir=str(export_dir),
                                         threshold=0.5, overwrite=True))
    assert sorted(os.listdir(tmp_path)) == ["1"]
    assert sorted(os.listdir(export_dir)) == ["old.txt"]


@pytest.mark.slow  # a MobileNetV2 SavedModel; the RANet ones stay fast
def test_a_baseline_serves_its_one_exit(tmp_path, splits, raw_images):
    # MobileNetV2 (depthwise convolutions, ReLU6): every image answers at its only exit.
    model = write_model_dir(tmp_path / "run", ModelConfig(name="mobilenet_v2", num_classes=10))
    saved_model.export(ExportOptions(model_dir=str(tmp_path / "run"),
                                     export_dir=str(tmp_path / "export")))
    served = tf.saved_model.load(str(tmp_path / "export")).signatures["serving_default"](
        images=tf.constant(raw_images[:16]))
    expected = model(data.normalize(raw_images[:16], splits.mean, splits.std), training=False)
    np.testing.assert_array_equal(served["exits"].numpy(), 1)
    np.testing.assert_array_equal(served["classes"].numpy(), expected[0].numpy().argmax(-1))

"""Exports a trained model as a SavedModel that TF Serving can host, with real early exit.

``python -m ranet.export --model_dir=/runs/ranet --export_dir=/serving/ranet/1``

TF Serving loads numbered version folders under a base path, so point ``--export_dir`` at
``<base>/<version>``. The SavedModel has three signatures, all taking

    images: float32 [N, H, W, 3], RAW RGB pixel values in 0..255 (not normalised)

and normalising inside with the training split's per-channel mean and std (stored as
constants), so a client sends pixels and needs no statistics:

* ``serving_default``: real early exit (``AdaptivePredictor.predict_batch``: stage k runs only
  for the images still undecided) at the thresholds of the chosen operating point, held in
  the ``thresholds`` variable (float32 [K]) of the SavedModel. Returns
  ``{"classes": int32 [N], "probabilities": float32 [N, C], "exits": int32 [N]}`` (exits
  1-based; the probabilities are the softmax of the exit each image left at).
* ``adaptive``: the same with ``thresholds`` float32 [K] given per call (e.g. another
  budget); an image leaves at the first exit k with confidence >= thresholds[k], and the
  last exit takes the rest whatever its threshold.
* ``all_exits``: the full network, ``{"logits_exit_1": float32 [N, C], ...,
  "logits_exit_K"}``.

``<export_dir>/assets.extra/ranet_export.json`` (TF Serving's place for files it does not
read) records the thresholds, how they were chosen, each exit's cumulative multiply-adds,
the normalisation and where the weights came from. JSON has no infinities, so non-finite
thresholds are written as the strings "inf" / "-inf": ``float(t)`` reads every entry.
"""

import contextlib
import dataclasses
import json
import math
import os
import shutil
import tempfile
from typing import Optional, Sequence

from absl import flags, logging

from ranet import cli

# TensorFlow is imported inside the functions that need it, so that the binary answers
# --help and flag errors without loading it.

SIGNATURE_NAMES = ("serving_default", "adaptive", "all_exits")
EXTRA_DIR = "assets.extra"
METADATA_FILENAME = "ranet_export.json"
DEFAULT_POINT = ("cheapest point calibrated on the validation split whose accuracy is within "
                 "1 point of the last exit's")

FLAGS = flags.FLAGS


def build_serving_module(model, thresholds: Sequence[float], mean: Sequence[float],
                         std: Sequence[float], confidence_kind: str = "max_softmax"):
    """Wraps a staged classifier for serving: raw pixels in, early-exit answers out.

    Args:
        model: a built ``StagedClassifier``.
        thresholds: one per exit, on the ``confidence_kind`` scale; becomes the module's
            ``thresholds`` variable, which ``serving_default`` reads.
        mean, std: per-channel statistics of the training split in 0..1 units
            (``DataSplits.mean`` / ``.std``); the module computes
            ``(images / 255 - mean) / std`` as training did.
        confidence_kind: one of ``ranet.adaptive.CONFIDENCE_KINDS``.

    Returns:
        A ``tf.Module`` with a ``thresholds`` variable and one ``tf.function`` per name in
        ``SIGNATURE_NAMES``, each with an input signature (see the module docstring), ready
        for ``tf.saved_model.save(module, path, signatures={name: getattr(module, name)})``.
    """
    import numpy as np
    import tensorflow as tf

    from ranet import adaptive

    thresholds = np.asarray(thresholds, np.float32)
    if thresholds.shape != (model.num_exits,):
        raise ValueError(f"thresholds needs one value per exit ({model.num_exits}). "
                         f"Received: thresholds={thresholds.tolist()}")
    mean, std = np.asarray(mean, np.float32), np.asarray(std, np.float32)
    if mean.shape != (3,) or std.shape != (3,) or not np.all(std > 0):
        raise ValueError("mean and std need 3 values each (one per RGB channel, 0..1 units), "
                         f"std positive. Received: mean={mean.tolist()}, std={std.tolist()}")
    # Built before the module so that a bad confidence_kind fails before anything is traced.
    predictor = adaptive.AdaptivePredictor(model, confidence_kind)
    num_exits, image_shape = model.num_exits, model.image_shape
    mean_constant, std_constant = tf.constant(mean), tf.constant(std)

    module = tf.Module(name="ranet_serving")
    # Tracked so that the SavedModel holds the weights; the predictor only reads them.
    module.model = model
    module.thresholds = tf.Variable(thresholds, trainable=False, name="thresholds")
    images_spec = tf.TensorSpec([None, *image_shape], tf.float32, name="images")
    thresholds_spec = tf.TensorSpec([num_exits], tf.float32, name="thresholds")

    def normalized(images):
        # The formula of data.normalized and of the input pipelines, in float32.
        return (images / 255.0 - mean_constant) / std_constant

    @tf.function(input_signature=[images_spec])
    def serving_default(images):
        return predictor.predict_batch(normalized(images), module.thresholds.read_value())

    @tf.function(input_signature=[images_spec, thresholds_spec])
    def adaptive_exit(images, thresholds):
        return predictor.predict_batch(normalized(images), thresholds)

    @tf.function(input_signature=[images_spec])
    def all_exits(images):
        logits = model(normalized(images), training=False)
        return {f"logits_exit_{k}": exit_logits for k, exit_logits in enumerate(logits, start=1)}

    module.serving_default = serving_default
    module.adaptive = adaptive_exit
    module.all_exits = all_exits
    return module


def _refuse_non_empty(export_dir: str, overwrite: bool) -> None:
    if os.path.isdir(export_dir) and os.listdir(export_dir) and not overwrite:
        raise ValueError(f"export_dir {export_dir} already exists and is not empty. Pass "
                         f"--overwrite to replace it, or choose a new folder (TF Serving: a new "
                         f"version number). Received: export_dir={export_dir}")


def _check_export_dir(export_dir: str, model_dir: str, overwrite: bool) -> None:
    """Refuses a destination that holds something, unless overwriting, and never the model."""
    if os.path.exists(export_dir) and not os.path.isdir(export_dir):
        raise ValueError(f"export_dir {export_dir} is a file, not a folder. Pass a folder path "
                         f"(e.g. /serving/ranet/1). Received: export_dir={export_dir}")
    _refuse_non_empty(export_dir, overwrite)
    # Replacing a folder that holds the model directory would delete the checkpoints.
    export_real, model_real = os.path.realpath(export_dir), os.path.realpath(model_dir)
    if os.path.commonpath([export_real, model_real]) == export_real:
        raise ValueError(f"export_dir must lie outside the model directory's tree: replacing it "
                         f"would delete the checkpoints. Choose another folder. "
                         f"Received: export_dir={export_dir}, model_dir={model_dir}")


def _check_operating_point(budget_mflops: Optional[float], threshold: Optional[float]) -> None:
    if budget_mflops is not None and threshold is not None:
        raise ValueError("--budget_mflops and --threshold both choose the thresholds; pass at most "
                         f"one. Received: budget_mflops={budget_mflops}, threshold={threshold}")
    if budget_mflops is not None and not (math.isfinite(budget_mflops) and budget_mflops > 0):
        raise ValueError("--budget_mflops must be a positive number of million multiply-adds per "
                         f"image. Received: budget_mflops={budget_mflops}")
    if threshold is not None and math.isnan(threshold):
        raise ValueError(f"--threshold must be a number. Received: threshold={threshold}")


def _operating_point(num_exits: int, budget_mflops: Optional[float],
                     threshold: Optional[float], num_validation_images: int) -> dict:
    """How the thresholds were chosen, for the metadata file."""
    if num_exits == 1:
        return {"rule": "single_exit"}
    if threshold is not None:
        return {"rule": "fixed_threshold", "threshold": threshold}
    calibration = {"calibrated_on": "validation", "num_images": num_validation_images}
    if budget_mflops is not None:
        return {"rule": "budget", "budget_mflops": budget_mflops,
                "description": "most accurate calibrated point within the budget", **calibration}
    return {"rule": "default", "description": DEFAULT_POINT, **calibration}


def _json_float(value: float):
    """A float as strict JSON: infinities become the strings "inf" and "-inf"."""
    return value if math.isfinite(value) else str(value)


def _write_atomically(module, metadata: dict, export_dir: str, overwrite: bool) -> None:
    """Saves into a hidden sibling folder, then renames it into place.

    A failure leaves export_dir as it was. TF Serving ignores the sibling, whose name is not
    a version number.
    """
    import tensorflow as tf

    export_dir = os.path.abspath(export_dir)
    parent, name = os.path.split(export_dir)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=parent)
    replaced = None
    try:
        logging.info("saving the SavedModel into %s", staging)
        # At INFO, saving logs every variable each signature captures: thousands of names.
        verbosity = logging.get_verbosity()
        logging.set_verbosity(min(verbosity, logging.WARNING))  # absl: lower is quieter
        try:
            tf.saved_model.save(module, staging, signatures={
                signature: getattr(module, signature) for signature in SIGNATURE_NAMES})
        finally:
            logging.set_verbosity(verbosity)
        os.makedirs(os.path.join(staging, EXTRA_DIR))
        with open(os.path.join(staging, EXTRA_DIR, METADATA_FILENAME), "w") as f:
            json.dump(metadata, f, indent=2, allow_nan=False)
        # Again: something may have appeared there while the model was calibrated and saved.
        _refuse_non_empty(export_dir, overwrite)
        if os.path.isdir(export_dir) and os.listdir(export_dir):
            # rename() replaces only an empty folder: move the old export aside first.
            replaced = tempfile.mkdtemp(prefix=f".{name}.old-", dir=parent)
            os.replace(export_dir, replaced)
        try:
            os.replace(staging, export_dir)
        except OSError:
            if replaced is not None:
                os.replace(replaced, export_dir)
                replaced = None
            raise
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if replaced is not None:
            # Empty, unless the old export could not be moved back: then it stays there.
            with contextlib.suppress(OSError):
                os.rmdir(replaced)
        raise
    if replaced is not None:
        shutil.rmtree(replaced, ignore_errors=True)


def export(model_dir: str, export_dir: str, *, checkpoint: str = "best",
           budget_mflops: Optional[float] = None, threshold: Optional[float] = None,
           confidence_kind: str = "max_softmax", data_dir: Optional[str] = None,
           overwrite: bool = False) -> dict:
    """Exports ``model_dir``'s checkpoint as a serving SavedModel at ``export_dir``.

    Args:
        model_dir: a model directory written by ``ranet.train``.
        export_dir: the SavedModel folder to write (for TF Serving, ``<base>/<version>``).
        checkpoint: "best" (on validation, falling back to the latest) or "latest".
        budget_mflops: serve the most accurate calibrated point whose expected cost is
            within this many million multiply-adds per image.
        threshold: serve the seed's single fixed threshold at every exit but the last.
            At most one of budget_mflops and threshold; neither gives the default point,
            the cheapest within 1 accuracy point of the last exit (on validation).
        confidence_kind: "max_softmax" or "entropy"; the thresholds are on its scale.
        data_dir: where the dataset is, instead of the ``data_dir`` in config.json. Needed
            for the training statistics and for calibration on the validation split.
        overwrite: replace a non-empty export_dir.

    Returns:
        The metadata written to ``<export_dir>/assets.extra/ranet_export.json``.
    """
    _check_operating_point(budget_mflops, threshold)
    _check_export_dir(export_dir, model_dir, overwrite)

    import tensorflow as tf

    from ranet import checkpoints, costs, data, evaluation

    config, model, checkpoint_path = checkpoints.restore_model(model_dir, checkpoint)
    logging.info("restored %s", checkpoint_path)
    data_config = config.data
    if data_dir is not None:
        data_config = dataclasses.replace(data_config, data_dir=data_dir)
    splits = data.load_splits(data_config)
    cost = costs.count(model)
    if model.num_exits > 1 and threshold is None:
        logging.info("calibrating the thresholds on %d validation images", len(splits.validation))
    thresholds = evaluation.operating_thresholds(model, cost, splits, budget_mflops=budget_mflops,
                                                 threshold=threshold,
                                                 confidence_kind=confidence_kind)
    logging.info("thresholds (%s): %s", confidence_kind, thresholds)
    module = build_serving_module(model, thresholds, splits.mean, splits.std, confidence_kind)
    metadata = {
        "model": config.model.name,
        "num_exits": model.num_exits,
        "num_classes": model.num_classes,
        "inputs": {"images": f"float32 [N, {', '.join(map(str, model.image_shape))}], raw RGB "
                             "pixel values in 0..255"},
        "signatures": list(SIGNATURE_NAMES),
        "confidence": confidence_kind,
        "thresholds": [_json_float(t) for t in thresholds],
        "operating_point": _operating_point(model.num_exits, budget_mflops, threshold,
                                            len(splits.validation)),
        "exit_macs": [e.macs for e in cost.exits],
        "params": cost.params,
        "normalization": {"formula": "(images / 255 - mean) / std",
                          "mean": [float(m) for m in splits.mean],
                          "std": [float(s) for s in splits.std]},
        "dataset": config.data.dataset,
        "model_dir": os.path.abspath(model_dir),
        "checkpoint": os.path.abspath(checkpoint_path),
        "tensorflow_version": tf.__version__,
    }
    _write_atomically(module, metadata, export_dir, overwrite)
    logging.info("exported to %s", os.path.abspath(export_dir))
    return metadata


def define_flags() -> None:
    """The binary's flags.

    Defined when the binary runs rather than at import, so that tests and other binaries
    can import ``export`` without defining (or clashing with) flags of the same names.
    """
    flags.DEFINE_string("model_dir", None, "Model directory written by ranet.train.",
                        required=True)
    flags.DEFINE_string("export_dir", None, "SavedModel folder to write; for TF Serving, "
                        "<base path>/<version number>.", required=True)
    flags.DEFINE_enum("checkpoint", "best", ["best", "latest"],
                      "best: best on validation (falling back to the latest); latest.")
    flags.DEFINE_float("budget_mflops", None, "Serve the most accurate operating point "
                       "calibrated within this many million multiply-adds per image.")
    flags.DEFINE_float("threshold", None, "Serve one fixed confidence threshold at every exit "
                       "but the last (the seed's 0.85). Default (neither this nor "
                       "--budget_mflops): the cheapest calibrated point within 1 accuracy point "
                       "of the last exit, on validation.")
    flags.DEFINE_enum("confidence", "max_softmax", ["max_softmax", "entropy"],
                      "Confidence the thresholds apply to (entropy: negative entropy).")
    flags.DEFINE_string("data_dir", None, "Where the dataset is, instead of the data_dir in "
                        "config.json (needed for the training statistics and calibration).")
    flags.DEFINE_bool("overwrite", False, "Replace a non-empty --export_dir.")


def main(argv):
    if len(argv) > 1:
        raise ValueError(f"unexpected arguments: {' '.join(argv[1:])}")
    logging.set_verbosity(logging.INFO)
    export(FLAGS.model_dir, FLAGS.export_dir, checkpoint=FLAGS.checkpoint,
           budget_mflops=FLAGS.budget_mflops, threshold=FLAGS.threshold,
           confidence_kind=FLAGS.confidence, data_dir=FLAGS.data_dir, overwrite=FLAGS.overwrite)


def run():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    define_flags()
    cli.run(main)


if __name__ == "__main__":
    run()

"""A trained model as a SavedModel that TF Serving can host, with real early exit.

``python -m ranet.export --model_dir=/runs/ranet --export_dir=/serving/ranet/1`` calls ``export``.

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

import os
from typing import List, Sequence

import numpy as np
import tensorflow as tf
from absl import logging

from ranet import data, jsonio
from ranet.inference import adaptive, calibration, points
from ranet.inference.serving import exporting

SIGNATURE_NAMES = ("serving_default", "adaptive", "all_exits")
EXTRA_DIR = "assets.extra"
METADATA_FILENAME = "ranet_export.json"


def build_serving_module(model, thresholds: Sequence[float], mean: Sequence[float],
                         std: Sequence[float], confidence_kind: str = adaptive.MAX_SOFTMAX):
    """Wraps a staged classifier for serving: raw pixels in, early-exit answers out.

    Args:
        model: a built ``StagedClassifier``.
        thresholds: one per exit, on the ``confidence_kind`` scale; becomes the module's
            ``thresholds`` variable, which ``serving_default`` reads.
        mean, std: per-channel statistics of the training split in 0..1 units
            (``DataSplits.mean`` / ``.std``); the module computes
            ``(images / 255 - mean) / std`` as training did.
        confidence_kind: one of ``adaptive.CONFIDENCE_KINDS``.

    Returns:
        A ``tf.Module`` with a ``thresholds`` variable and one ``tf.function`` per name in
        ``SIGNATURE_NAMES``, each with an input signature (see the module docstring), ready
        for ``tf.saved_model.save(module, path, signatures={name: getattr(module, name)})``.
    """
    thresholds = np.asarray(thresholds, np.float32)
    if thresholds.shape != (model.num_exits,):
        raise ValueError(f"thresholds needs one value per exit ({model.num_exits}). "
                         f"Received: thresholds={thresholds.tolist()}")
    mean, std = np.asarray(mean, np.float32), np.asarray(std, np.float32)
    if mean.shape != (3,) or std.shape != (3,) or not np.all(std > 0):
        raise ValueError("mean and std need 3 values each (one per RGB channel, 0..1 units), "
                         f"std positive. Received: mean={mean.tolist()}, std={std.tolist()}")
    # Built before the module so that a bad confidence_kind fails before anything is traced.
    predictor = adaptive.AdaptivePredictor(model, confidence_kind, normalization=(mean, std))
    num_exits, image_shape = model.num_exits, model.image_shape

    module = tf.Module(name="ranet_serving")
    # Tracked so that the SavedModel holds the weights; the predictor only reads them.
    module.model = model
    module.thresholds = tf.Variable(thresholds, trainable=False, name="thresholds")
    images_spec = tf.TensorSpec([None, *image_shape], tf.float32, name="images")
    thresholds_spec = tf.TensorSpec([num_exits], tf.float32, name="thresholds")

    @tf.function(input_signature=[images_spec])
    def serving_default(images):
        return predictor.predict_batch(images, module.thresholds.read_value())

    @tf.function(input_signature=[images_spec, thresholds_spec])
    def adaptive_exit(images, thresholds):
        return predictor.predict_batch(images, thresholds)

    @tf.function(input_signature=[images_spec])
    def all_exits(images):
        logits = model(data.normalize(images, mean, std), training=False)
        return {f"logits_exit_{k}": exit_logits for k, exit_logits in enumerate(logits, start=1)}

    module.serving_default = serving_default
    module.adaptive = adaptive_exit
    module.all_exits = all_exits
    return module


def serving_thresholds(restored: exporting.RestoredModel,
                       options: exporting.ExportOptions) -> List[float]:
    """The one operating point the SavedModel serves, calibrated on the validation split."""
    model, splits = restored.model, restored.splits
    if options.threshold is not None:
        return [float(t) for t in calibration.fixed_threshold(options.threshold,
                                                              model.num_exits)]
    if model.num_exits > 1:
        logging.info("calibrating the thresholds on %d validation images", len(splits.validation))
    probabilities = adaptive.all_exit_probabilities(
        model, data.normalize(splits.validation.images, splits.mean, splits.std))
    chosen = exporting.served_thresholds(
        probabilities, splits.validation.labels, [e.macs for e in restored.cost.exits],
        splits.num_classes, confidence_kind=options.confidence,
        budgets_mflops=options.budget_mflops)
    return chosen[points.budget(options.budget_mflops[0]) if options.budget_mflops
                  else points.DEFAULT]


def export(options: exporting.ExportOptions) -> dict:
    """Exports ``options.model_dir``'s checkpoint as a serving SavedModel at ``export_dir``.

    Returns the metadata written to ``<export_dir>/assets.extra/ranet_export.json``.
    """
    restored = exporting.restore(options)
    model = restored.model
    thresholds = serving_thresholds(restored, options)
    logging.info("thresholds (%s): %s", options.confidence, thresholds)
    module = build_serving_module(model, thresholds, restored.splits.mean,
                                  restored.splits.std, options.confidence)
    metadata = {
        **exporting.metadata(restored, options),
        "thresholds": [jsonio.number(t) for t in thresholds],
        "inputs": {"images": f"float32 [N, {', '.join(map(str, model.image_shape))}], raw RGB "
                             "pixel values in 0..255"},
        "signatures": list(SIGNATURE_NAMES),
        "tensorflow_version": tf.__version__,
    }

    def write(staging: str) -> None:
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
        jsonio.write(os.path.join(staging, EXTRA_DIR, METADATA_FILENAME), metadata)

    exporting.write_atomically(options, write)
    return metadata

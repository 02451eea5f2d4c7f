"""Exporting a trained model, whatever the format: options, checks, thresholds, an atomic write.

``restore`` rebuilds the model from its directory and calibrates the thresholds of the
operating point to serve on the validation split; a format module (``saved_model``) turns that
into files in a staging folder; ``write_atomically`` renames the folder into place, so a
failure leaves ``--export_dir`` as it was.
"""

import contextlib
import dataclasses
import math
import os
import shutil
import tempfile
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np
from absl import logging

from ranet import costs, data
from ranet.data import report_images
from ranet.config import ExperimentConfig, flag, require
from ranet.costs import ModelCost
from ranet.errors import UsageError
from ranet.inference import adaptive, calibration, points
from ranet.inference.points import PointId
from ranet.models import StagedClassifier
from ranet.training import model_dir as model_dir_lib

DEFAULT_POINT = ("cheapest point calibrated on the validation split whose accuracy is within "
                 "1 point of the last exit's")


FORMATS = ("saved_model", "litert")
LITERT_PRECISIONS = ("fp32", "int8")


@dataclasses.dataclass(frozen=True)
class ExportOptions:
    """What to export, where, and at which operating points (the flags of ``ranet.export``)."""
    model_dir: str = flag("", "Model directory written by ranet.train.")
    export_dir: str = flag("", "Folder to write; for TF Serving, <base path>/<version number>.")
    format: str = flag("saved_model", "saved_model: a SavedModel for TF Serving; litert: one "
                       "LiteRT file per stage and manifest.json, for CPUs and edge devices.",
                       choices=FORMATS)
    checkpoint: str = flag("best", "best: best on validation (falling back to the latest); "
                           "latest.", choices=model_dir_lib.CHECKPOINT_CHOICES)
    budget_mflops: tuple = flag(
        (), "Compute budgets in million multiply-adds per image: the most accurate point "
        "calibrated within each. The SavedModel serves one; the LiteRT manifest records each "
        "beside the default point.", kind="floats")
    threshold: Optional[float] = flag(
        None, "Serve one fixed confidence threshold at every exit but the last (the seed's "
        "0.85). Default (neither this nor --budget_mflops): the cheapest calibrated point "
        "within 1 accuracy point of the last exit, on validation.", kind="float")
    confidence: str = flag(adaptive.MAX_SOFTMAX, "Confidence the thresholds apply to (entropy: "
                           "negative entropy).", choices=adaptive.CONFIDENCE_KINDS)
    data_dir: Optional[str] = flag(
        None, "Where the dataset is, instead of the data_dir in config.json (needed for the "
        "training statistics and calibration).", kind="str")
    overwrite: bool = flag(False, "Replace a non-empty --export_dir.")
    litert_precision: tuple = flag(
        LITERT_PRECISIONS, "LiteRT: fp32, and int8 (full-integer post-training quantisation "
        "with float32 inputs and outputs); each gets its own files and thresholds.",
        kind="list")
    representative_images: int = flag(
        report_images.REPRESENTATIVE_IMAGES, "LiteRT int8: training images that calibrate the "
        "quantisation ranges (ranet.eval takes the same flag and converts alike).")
    max_images: int = flag(
        0, "Calibrate the thresholds on at most this many validation images, a class-balanced "
        "seeded sample (0: all). The images are read into memory: ImageNet's take 150 KB each.",
        lower_bound=0)

    def __post_init__(self):
        require(bool(self.model_dir), "--model_dir is required: the model directory to export")
        require(bool(self.export_dir), "--export_dir is required: the folder to write")
        require(not (self.budget_mflops and self.threshold is not None),
                "--budget_mflops and --threshold both choose the thresholds; pass at most one. "
                f"Received: budget_mflops={list(self.budget_mflops)}, threshold={self.threshold}")
        require(all(math.isfinite(b) and b > 0 for b in self.budget_mflops),
                "--budget_mflops must be a positive number of million multiply-adds per image. "
                f"Received: budget_mflops={list(self.budget_mflops)}")
        require(self.format != "saved_model" or len(self.budget_mflops) <= 1,
                "a SavedModel serves one operating point: pass one --budget_mflops (the LiteRT "
                f"manifest records several). Received: budget_mflops={list(self.budget_mflops)}")
        require(self.threshold is None or not math.isnan(self.threshold),
                f"--threshold must be a number. Received: threshold={self.threshold}")
        require(bool(self.litert_precision) and all(
            p in LITERT_PRECISIONS for p in self.litert_precision),
                f"litert_precision must be one or more of {', '.join(LITERT_PRECISIONS)}. "
                f"Received: litert_precision={','.join(self.litert_precision)}")
        require(self.representative_images > 0, "--representative_images must be positive. "
                f"Received: {self.representative_images}")


@dataclasses.dataclass(frozen=True, eq=False)
class RestoredModel:
    """A trained model ready to export: its configuration, weights, statistics and cost."""
    config: ExperimentConfig
    model: StagedClassifier
    checkpoint: str
    splits: data.DataSplits
    cost: ModelCost


def check_export_dir(options: ExportOptions) -> None:
    """Refuses a destination that holds something, unless overwriting, and never the model."""
    export_dir, model_dir = options.export_dir, options.model_dir
    if os.path.exists(export_dir) and not os.path.isdir(export_dir):
        raise UsageError(f"export_dir {export_dir} is a file, not a folder. Pass a folder path "
                         f"(e.g. /serving/ranet/1). Received: export_dir={export_dir}")
    _refuse_non_empty(export_dir, options.overwrite)
    # Replacing a folder that holds the model directory would delete the checkpoints.
    export_real, model_real = os.path.realpath(export_dir), os.path.realpath(model_dir)
    if os.path.commonpath([export_real, model_real]) == export_real:
        raise UsageError(f"export_dir must lie outside the model directory's tree: replacing it "
                         f"would delete the checkpoints. Choose another folder. "
                         f"Received: export_dir={export_dir}, model_dir={model_dir}")


def _refuse_non_empty(export_dir: str, overwrite: bool) -> None:
    if os.path.isdir(export_dir) and os.listdir(export_dir) and not overwrite:
        raise UsageError(f"export_dir {export_dir} already exists and is not empty. Pass "
                         f"--overwrite to replace it, or choose a new folder (TF Serving: a new "
                         f"version number). Received: export_dir={export_dir}")


def operating_point(num_exits: int, options: ExportOptions, num_validation_images: int) -> dict:
    """How the thresholds were chosen, for the metadata file."""
    if num_exits == 1:
        return {"rule": "single_exit"}
    if options.threshold is not None:
        return {"rule": "fixed_threshold", "threshold": options.threshold}
    calibration = {"calibrated_on": "validation", "num_images": num_validation_images}
    if options.budget_mflops:
        return {"rule": "budget", "budget_mflops": list(options.budget_mflops),
                "description": "most accurate calibrated point within each budget",
                "default": DEFAULT_POINT, **calibration}
    return {"rule": "default", "description": DEFAULT_POINT, **calibration}


def restore(options: ExportOptions) -> RestoredModel:
    """Checks the destination, then restores the model and its data."""
    check_export_dir(options)
    config, model, checkpoint = model_dir_lib.restore_model(options.model_dir,
                                                            options.checkpoint)
    logging.info("restored %s", checkpoint)
    return RestoredModel(config=config, model=model, checkpoint=checkpoint,
                         splits=data.load_splits_in_memory(
                             config.data.with_data_dir(options.data_dir),
                             max_images=options.max_images,
                             train_images=options.representative_images, include_test=False),
                         cost=costs.count(model))


def metadata(restored: RestoredModel, options: ExportOptions) -> dict:
    """What every export records beside its files: costs, normalisation, origin, the rule."""
    model = restored.model
    return {
        "model": restored.config.model.name,
        "num_exits": model.num_exits,
        "num_classes": model.num_classes,
        "confidence": options.confidence,
        "operating_point": operating_point(model.num_exits, options,
                                           len(restored.splits.validation)),
        "exit_macs": [e.macs for e in restored.cost.exits],
        "params": restored.cost.params,
        "normalization": {"formula": "(images / 255 - mean) / std",
                          "mean": [float(m) for m in restored.splits.mean],
                          "std": [float(s) for s in restored.splits.std]},
        "dataset": restored.config.data.dataset,
        "model_dir": os.path.abspath(options.model_dir),
        "checkpoint": os.path.abspath(restored.checkpoint),
    }


def write_atomically(options: ExportOptions, write: Callable[[str], Any]) -> Any:
    """Calls ``write(staging_dir)``, then renames the staging folder to ``export_dir``.

    The staging folder is a hidden sibling, which TF Serving ignores (its name is not a
    version number). A failure leaves export_dir as it was. Returns what ``write`` returned.
    """
    export_dir = os.path.abspath(options.export_dir)
    parent, name = os.path.split(export_dir)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=parent)
    replaced = None
    try:
        written = write(staging)
        # Again: something may have appeared there while the model was calibrated and saved.
        _refuse_non_empty(export_dir, options.overwrite)
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
    logging.info("exported to %s", export_dir)
    return written


def served_thresholds(probabilities: np.ndarray, labels: np.ndarray, exit_macs: Sequence[int],
                      num_classes: int, *, confidence_kind: str = adaptive.MAX_SOFTMAX,
                      budgets_mflops: Sequence[float] = (),
                      threshold: Optional[float] = None) -> Dict[PointId, List[float]]:
    """Thresholds to serve, calibrated on every exit's softmax over a validation split.

    Args:
        probabilities: [K, N, C] softmax of every exit, from the runtime that will serve.
        labels: [N] their true classes.

    Returns:
        ``points.DEFAULT``, ``points.budget(b)`` for each budget and, with ``threshold``,
        ``points.fixed(threshold)`` -> one threshold per exit (``calibrate_points``).
    """
    num_exits = len(exit_macs)
    wanted = [points.DEFAULT, *map(points.budget, budgets_mflops),
              *([] if threshold is None else [points.fixed(threshold)])]
    if num_exits == 1:
        return {point: list(calibration.first_exit_only(1)) for point in wanted}
    if probabilities.shape[1] == 0:
        raise UsageError("Calibrating exit thresholds needs the validation split, but this model "
                         "was trained with --validation_size=0. Pass --threshold instead.")
    calibrated = calibration.calibrate_points(
        adaptive.confidence(probabilities, confidence_kind),
        np.argmax(probabilities, axis=-1), labels, exit_macs,
        num_classes, budgets_mflops=budgets_mflops, fixed=threshold)
    return {point: [float(t) for t in calibrated[point].thresholds] for point in wanted}

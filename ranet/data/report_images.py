"""The images an evaluation calibrates on and reports on, and the training sample of int8.

Thresholds are always calibrated on images that are NOT the ones reported: on the validation
split when reporting the test split, and on one class-balanced half of the validation split
when reporting the other half (``--split=validation``). The int8 conversion's representative
images are the same training sample for the eval and for the export
(``representative_pixels``), so that both convert to the same files.
"""

import dataclasses
import functools

import numpy as np

from ranet import data
from ranet.data import splits as splits_lib
from ranet.errors import UsageError

# Training images the int8 conversion calibrates its quantisation ranges on, by default.
REPRESENTATIVE_IMAGES = 256
# The seed of that sample: fixed, so the eval and the export pick the same images whatever
# their other seeds.
_REPRESENTATIVE_SEED = 0


def representative_pixels(train: splits_lib.Split, count: int) -> np.ndarray:
    """``count`` training images (raw pixels, in their order in the split), the same for any
    caller: the representative dataset of the int8 conversion."""
    rows = np.random.default_rng(_REPRESENTATIVE_SEED).choice(
        len(train), min(count, len(train)), replace=False)
    return train.images[np.sort(rows)]


@dataclasses.dataclass(frozen=True, eq=False)
class EvaluationImages:
    """Images (raw uint8 pixels) and labels to calibrate on and to report on.

    ``calibration_images`` and ``report_images`` are the same pixels normalised as the models
    were trained; ``training_pixels`` is the int8 conversion's representative sample.
    """
    calibration_name: str
    calibration_pixels: np.ndarray
    calibration_labels: np.ndarray
    report_name: str
    report_pixels: np.ndarray
    report_labels: np.ndarray
    num_classes: int
    mean: np.ndarray
    std: np.ndarray
    training_pixels: np.ndarray

    @functools.cached_property
    def calibration_images(self) -> np.ndarray:
        return splits_lib.normalize(self.calibration_pixels, self.mean, self.std)

    @functools.cached_property
    def report_images(self) -> np.ndarray:
        return splits_lib.normalize(self.report_pixels, self.mean, self.std)

    @property
    def normalization(self):
        return self.mean, self.std


def evaluation_images(splits: splits_lib.DataSplits, split: str, seed: int,
                      representative_images: int = REPRESENTATIVE_IMAGES) -> EvaluationImages:
    """Calibration and report images for ``--split=test|validation``."""
    if len(splits.validation) < 2:
        raise UsageError("Calibrating exit thresholds needs the validation split, but this model "
                         "was trained with --validation_size=0. Retrain with a validation split.")
    if split == "test":
        calibration_split, report_split = splits.validation, data.require_split(splits, "test")
        names = ("validation", "test")
    elif split == "validation":
        calibration_split, report_split = splits_lib.split_in_two(splits.validation,
                                                                  splits.num_classes, seed)
        names = ("validation (half A)", "validation (half B)")
    else:
        raise ValueError(f"split must be test or validation. Received: split={split!r}")
    return EvaluationImages(
        calibration_name=names[0], calibration_pixels=calibration_split.images,
        calibration_labels=calibration_split.labels, report_name=names[1],
        report_pixels=report_split.images, report_labels=report_split.labels,
        num_classes=splits.num_classes, mean=splits.mean, std=splits.std,
        training_pixels=representative_pixels(splits.train, representative_images))


def load_images(data_config, split: str, seed: int = 0, max_images: int = 0,
                representative_images: int = REPRESENTATIVE_IMAGES) -> EvaluationImages:
    """The dataset of ``data_config`` (a ``DataConfig``), split for reporting: at most
    ``max_images`` of each split (0: all)."""
    return evaluation_images(data.load_splits_in_memory(
        data_config, max_images=max_images, train_images=representative_images,
        include_test=split == "test", seed=seed), split, seed, representative_images)

"""The splits of a dataset: types, the validation hold-out, channel statistics, normalisation.

Normalisation units: ``DataSplits.mean`` and ``DataSplits.std`` are in 0..1 units (pixel / 255),
computed over the train split (after the validation hold-out). ``normalize`` is the one formula
every input takes on its way into a model: ``(pixel / 255 - mean) / std`` in float32, on numpy
arrays (evaluation) and on tensors (the input pipelines and exported graphs) alike.
"""

import dataclasses
import math
from typing import Optional

import numpy as np
import tensorflow as tf

from ranet.errors import UsageError

CHANNELS = 3


class DataError(UsageError):
    """The data could not be found, or a data file is missing, unsafe or malformed."""


@dataclasses.dataclass(frozen=True, eq=False)
class Split:
    """Images uint8 (N, H, W, 3) and labels int32 (N,)."""
    images: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, rows) -> "Split":
        """The rows selected by an index array or a boolean mask, in order."""
        return Split(self.images[rows], self.labels[rows])


@dataclasses.dataclass(frozen=True, eq=False)
class DataSplits:
    """A dataset's splits and statistics; ``mean``/``std`` are float32 (3,) in 0..1 units."""
    name: str
    train: Split
    validation: Split
    test: Optional[Split]
    num_classes: int
    mean: np.ndarray
    std: np.ndarray
    source: str  # the folder the files came from, or "synthetic"


def _class_quotas(counts: np.ndarray, total: int) -> np.ndarray:
    """Splits ``total`` over classes as evenly as their sizes allow; lower ids take remainders."""
    quotas = np.zeros_like(counts)
    remaining = total
    while remaining > 0:
        open_classes = np.flatnonzero(quotas < counts)
        share, extra = divmod(remaining, len(open_classes))
        add = np.full(len(open_classes), share)
        add[:extra] += 1
        add = np.minimum(add, counts[open_classes] - quotas[open_classes])
        quotas[open_classes] += add
        remaining -= int(add.sum())
    return quotas


def held_out_mask(labels: np.ndarray, size: int, num_classes: int, seed: int) -> np.ndarray:
    """True for ``size`` rows picked class-balanced at random, reproducible from ``seed``.

    The one hold-out rule of every dataset: CIFAR's arrays and ImageNet's record index alike.
    """
    if size >= len(labels):
        raise DataError(f"validation_size must be smaller than the {len(labels)} training images, "
                        f"or nothing is left to train on. Pass a smaller --validation_size. "
                        f"Received: validation_size={size}")
    # One uniform key per row: per-class picks are the smallest keys, reproducible from seed.
    keys = np.random.default_rng(seed).random(len(labels))
    quotas = _class_quotas(np.bincount(labels, minlength=num_classes), size)
    picked = []
    for label, quota in enumerate(quotas):
        rows = np.flatnonzero(labels == label)
        picked.append(rows[np.argsort(keys[rows], kind="stable")[:quota]])
    is_held_out = np.zeros(len(labels), bool)
    is_held_out[np.concatenate(picked)] = True
    return is_held_out


def sample_mask(labels: np.ndarray, limit: int, num_classes: int, seed: int) -> np.ndarray:
    """True for at most ``limit`` rows (0: every row), class-balanced by the hold-out rule."""
    if not limit or limit >= len(labels):
        return np.ones(len(labels), bool)
    return held_out_mask(labels, limit, num_classes, seed)


def hold_out(full: Split, size: int, num_classes: int, seed: int) -> tuple:
    """(rest, held out): ``size`` rows picked class-balanced at random; both keep file order."""
    is_held_out = held_out_mask(full.labels, size, num_classes, seed)
    return full.subset(~is_held_out), full.subset(is_held_out)


def split_in_two(split: Split, num_classes: int, seed: int) -> tuple:
    """Two disjoint, class-balanced halves of a split, reproducible from ``seed``.

    The eval binary calibrates exit thresholds on one half of the validation
    split and reports on the other when no test split is asked for.
    """
    return hold_out(split, len(split) // 2, num_classes, seed)


def channel_statistics(images: np.ndarray) -> tuple:
    """Per-channel mean and std in 0..1 units, exact, via pixel-value histograms."""
    values = np.arange(256, dtype=np.float64) / 255.0
    means, stds = [], []
    for channel in range(CHANNELS):
        counts = np.bincount(images[..., channel].ravel(), minlength=256)
        mean = counts @ values / counts.sum()
        means.append(mean)
        stds.append(math.sqrt(counts @ (values - mean) ** 2 / counts.sum()))
    return np.array(means, np.float32), np.array(stds, np.float32)


def normalize(images, mean, std):
    """uint8 (or float) pixels -> the float32 inputs the models are trained on.

    ``(images / 255 - mean) / std`` with ``mean``/``std`` in 0..1 units. A numpy array gives
    a numpy array; a tensor gives a tensor (the same float32 operations, so both agree).
    """
    mean, std = np.asarray(mean, np.float32), np.asarray(std, np.float32)
    if isinstance(images, np.ndarray):
        images = images.astype(np.float32)
    else:
        images = tf.cast(images, tf.float32)
    return (images / np.float32(255.0) - mean) / std

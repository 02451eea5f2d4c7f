"""The data: ``load_splits(config)`` reads a dataset and holds out its validation split.

``cifar`` and ``synthetic`` read the images, ``splits`` holds them out and normalises them,
``pipeline`` feeds them to a tf.distribute strategy.
"""

import numpy as np

from ranet.data import cifar, synthetic
from ranet.data.pipeline import (eval_input_fn, num_eval_steps, steps_per_epoch,
                                 train_input_fn)
from ranet.data.splits import (DataError, DataSplits, Split, channel_statistics, hold_out,
                               normalize, split_in_two)

SPLIT_NAMES = ("train", "validation", "test")
_SOURCES = {"cifar10": cifar.load, "cifar100": cifar.load, "synthetic": synthetic.load}


def load_splits(config) -> DataSplits:
    """Loads ``config.dataset`` and holds out ``config.validation_size`` training images."""
    full_train, test, source = _SOURCES[config.dataset](config)
    train, validation = hold_out(full_train, config.validation_size, config.num_classes,
                                 config.split_seed)
    if config.normalization_mean is not None:
        mean = np.array(config.normalization_mean, np.float32)
        std = np.array(config.normalization_std, np.float32)
    else:
        mean, std = channel_statistics(train.images)
    return DataSplits(name=config.dataset, train=train, validation=validation, test=test,
                      num_classes=config.num_classes, mean=mean, std=std, source=source)


def require_split(splits: DataSplits, name: str) -> Split:
    """The split called ``name`` ("train", "validation" or "test"); DataError if absent."""
    if name not in SPLIT_NAMES:
        raise DataError(f"split must be one of {', '.join(SPLIT_NAMES)}. Received: split={name!r}")
    split = getattr(splits, name)
    if split is None:
        raise DataError(f"The {name} split is missing from {splits.source}: it has no "
                        f"{cifar.TEST_FILES.get(splits.name, name)} file. Evaluate on the "
                        "validation split, or pass --data_dir pointing at a folder that has the "
                        f"test file. Received: split={name!r}")
    return split


__all__ = ["DataError", "DataSplits", "SPLIT_NAMES", "Split", "eval_input_fn", "load_splits",
           "normalize", "num_eval_steps", "require_split", "split_in_two", "steps_per_epoch",
           "train_input_fn"]

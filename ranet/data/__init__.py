"""The data: ``load_splits(config)`` reads a dataset and holds out its validation split.

``cifar`` and ``synthetic`` read the images into memory, ``splits`` holds them out and
normalises them, ``pipeline`` feeds them to a tf.distribute strategy. ``imagenet`` keeps its
splits on disk (TFRecord shards) and streams them; ``train_input_fn`` and ``eval_input_fn``
here take either kind of split. ``load_splits_in_memory`` gives the eval and export binaries
arrays of every dataset (ImageNet's decoded samples).
"""

import dataclasses

import numpy as np

from ranet.data import cifar, imagenet, pipeline, synthetic
from ranet.data.pipeline import num_eval_steps, steps_per_epoch
from ranet.data.splits import (DataError, DataSplits, Split, channel_statistics, hold_out,
                               normalize, sample_mask, split_in_two)

SPLIT_NAMES = ("train", "validation", "test")
_SOURCES = {"cifar10": cifar.load, "cifar100": cifar.load, "synthetic": synthetic.load}


def load_splits(config) -> DataSplits:
    """Loads ``config.dataset`` and holds out ``config.validation_size`` training images (and
    ``config.test_size`` as the test split, first)."""
    if config.dataset == "imagenet":
        return imagenet.load_splits(config)
    full_train, test, source = _SOURCES[config.dataset](config)
    if config.test_size:
        if test is not None:
            raise DataError(f"{source} has its own test split; --test_size holds one out of "
                            "the training images only where the folder has none. Drop "
                            f"--test_size. Received: test_size={config.test_size}")
        if config.test_size + config.validation_size >= len(full_train):
            raise DataError(f"--test_size={config.test_size} and --validation_size="
                            f"{config.validation_size} together take all {len(full_train)} "
                            "training images; make them smaller.")
        # A seed of its own, so that the validation split is drawn afresh from what is left.
        full_train, test = hold_out(full_train, config.test_size, config.num_classes,
                                    config.split_seed + 1)
    train, validation = hold_out(full_train, config.validation_size, config.num_classes,
                                 config.split_seed)
    if config.normalization_mean is not None:
        mean = np.array(config.normalization_mean, np.float32)
        std = np.array(config.normalization_std, np.float32)
    else:
        mean, std = channel_statistics(train.images)
    return DataSplits(name=config.dataset, train=train, validation=validation, test=test,
                      num_classes=config.num_classes, mean=mean, std=std, source=source)


def load_splits_in_memory(config, *, max_images: int = 0, train_images: int = 256,
                          include_test: bool = True, seed: int = 0) -> DataSplits:
    """``load_splits`` as arrays, for what works on arrays (the eval and export binaries).

    Validation and test are cut to at most ``max_images`` each (0: all) by a class-balanced
    seeded sample. ImageNet's splits are decoded through the evaluation transform (256/224),
    train as a sample of ``train_images`` (all that evaluation and export read of it), test
    only with ``include_test``.
    """
    splits = load_splits(config)
    if config.dataset == "imagenet":
        return imagenet.splits_in_memory(splits, max_images=max_images, train_images=train_images,
                                         include_test=include_test, seed=seed)

    def cut(split):
        if split is None:
            return None
        return split.subset(sample_mask(split.labels, max_images, splits.num_classes, seed))

    return dataclasses.replace(splits, validation=cut(splits.validation), test=cut(splits.test))


def train_input_fn(split, *, deterministic: bool = True, skip_bad_records: bool = False,
                   tf_data_service=None, crop_padding: int = 4, **options):
    """The training input function of a split in memory or on disk (``pipeline``, ``imagenet``).

    The in-memory pipeline is always deterministic; ``deterministic``, ``skip_bad_records``
    and ``tf_data_service`` concern the streamed one, ``crop_padding`` the in-memory one.
    """
    if isinstance(split, imagenet.RecordSplit):
        return imagenet.train_input_fn(split, deterministic=deterministic,
                                       skip_bad_records=skip_bad_records,
                                       tf_data_service=tf_data_service, **options)
    return pipeline.train_input_fn(split, crop_padding=crop_padding, **options)


def eval_input_fn(split, **options):
    """One padded evaluation pass over a split in memory or on disk."""
    if isinstance(split, imagenet.RecordSplit):
        return imagenet.eval_input_fn(split, **options)
    return pipeline.eval_input_fn(split, **options)


def require_split(splits: DataSplits, name: str) -> Split:
    """The split called ``name`` ("train", "validation" or "test"); DataError if absent."""
    if name not in SPLIT_NAMES:
        raise DataError(f"split must be one of {', '.join(SPLIT_NAMES)}. Received: split={name!r}")
    split = getattr(splits, name)
    if split is None:
        raise DataError(f"The {name} split is missing from {splits.source}: it has no "
                        f"{cifar.TEST_FILES.get(splits.name, name)} file. Evaluate on the "
                        "validation split, pass --data_dir pointing at a folder that has the "
                        "test file, or train with --test_size=N to hold N training images out "
                        f"as one. Received: split={name!r}")
    return split


__all__ = ["DataError", "DataSplits", "SPLIT_NAMES", "Split", "eval_input_fn", "load_splits",
           "load_splits_in_memory",
           "normalize", "num_eval_steps", "require_split", "split_in_two", "steps_per_epoch",
           "train_input_fn"]

"""ranet.data.splits and synthetic data: hold-outs, statistics, normalisation, real CIFAR-10."""

import dataclasses

import numpy as np
import tensorflow as tf

from ranet import data
from ranet.config import DataConfig


def test_synthetic_is_deterministic_and_sized():
    config = DataConfig(dataset="synthetic", validation_size=48, synthetic_train_size=240,
                        synthetic_test_size=60, split_seed=7)
    first, second = data.load_splits(config), data.load_splits(config)
    assert (len(first.train), len(first.validation), len(first.test)) == (192, 48, 60)
    for name in ("train", "validation", "test"):
        np.testing.assert_array_equal(getattr(first, name).images, getattr(second, name).images)
        np.testing.assert_array_equal(getattr(first, name).labels, getattr(second, name).labels)
    other = data.load_splits(dataclasses.replace(config, split_seed=8))
    assert not np.array_equal(first.train.images, other.train.images)
    assert first.source == "synthetic" and first.num_classes == 10
    # Learnable: every test image is closest to the train-class mean of its own class.
    means = np.stack([first.train.images[first.train.labels == c].mean(0) for c in range(10)])
    dists = ((first.test.images[:, None].astype(float) - means[None]) ** 2).sum((2, 3, 4))
    np.testing.assert_array_equal(dists.argmin(1), first.test.labels)


def test_fixed_normalization_replaces_the_train_split_statistics():
    computed = data.load_splits(DataConfig(dataset="synthetic", validation_size=0))
    assert not np.allclose(computed.mean, 0.5)
    fixed = data.load_splits(DataConfig(dataset="synthetic", validation_size=0,
                                        normalization_mean=(0.5, 0.4, 0.3),
                                        normalization_std=(0.25, 0.2, 0.1)))
    np.testing.assert_array_equal(fixed.mean, np.float32([0.5, 0.4, 0.3]))
    np.testing.assert_array_equal(fixed.std, np.float32([0.25, 0.2, 0.1]))
    np.testing.assert_array_equal(fixed.train.images, computed.train.images)


def test_normalize_is_one_formula_for_arrays_and_tensors():
    pixels = np.random.default_rng(0).integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)
    mean, std = [0.49, 0.48, 0.45], [0.25, 0.24, 0.26]
    from_numpy = data.normalize(pixels, mean, std)
    from_tensor = data.normalize(tf.constant(pixels), mean, std)
    assert from_numpy.dtype == np.float32 and from_tensor.dtype == tf.float32
    np.testing.assert_array_equal(from_numpy, from_tensor.numpy())  # bit for bit
    np.testing.assert_allclose(from_numpy, (pixels / 255.0 - mean) / std, rtol=1e-6, atol=1e-6)
    # Raw float pixels (what serving receives) take the same formula.
    np.testing.assert_array_equal(data.normalize(pixels.astype(np.float32), mean, std), from_numpy)


def test_split_in_two_gives_disjoint_class_balanced_halves():
    labels = np.repeat(np.arange(4), 10).astype(np.int32)
    split = data.Split(np.arange(40, dtype=np.uint8).reshape(40, 1, 1, 1), labels)
    first, second = data.split_in_two(split, num_classes=4, seed=1)
    assert len(first) == len(second) == 20
    np.testing.assert_array_equal(np.bincount(second.labels), [5, 5, 5, 5])
    assert not set(first.images.ravel()) & set(second.images.ravel())
    again = data.split_in_two(split, num_classes=4, seed=1)[1]
    np.testing.assert_array_equal(again.images, second.images)


# --------------------------------------------------------------------------------------------
# The real training set, where present.

def test_real_cifar10_training_set(real_cifar10):
    folder = real_cifar10
    splits = data.load_splits(DataConfig(data_dir=str(folder), validation_size=5000))
    assert (len(splits.train), len(splits.validation)) == (45000, 5000)
    np.testing.assert_array_equal(np.bincount(splits.validation.labels, minlength=10), 500)
    assert splits.test is None
    np.testing.assert_allclose(splits.mean * 255, [125.3, 122.9, 113.9], atol=0.5)
    assert np.all((0.2 < splits.std) & (splits.std < 0.3))

"""Synthetic images: class prototypes of coarse colour blocks plus noise, learnable in seconds."""

import numpy as np

from ranet.data.splits import CHANNELS, Split

IMAGE_SIZE = 32
# The random stream of synthetic data, apart from the pipeline's (ranet.data.pipeline).
_STREAM = 0


def _samples(prototypes: np.ndarray, size: int, rng: np.random.Generator) -> Split:
    """Balanced samples: class prototype plus pixel noise."""
    num_classes = len(prototypes)
    labels = rng.permutation(np.arange(size) % num_classes).astype(np.int32)
    noise = rng.standard_normal((size, IMAGE_SIZE, IMAGE_SIZE, CHANNELS), dtype=np.float32)
    images = np.clip(prototypes[labels] + 32.0 * noise, 0, 255).astype(np.uint8)
    return Split(images, labels)


def load(config) -> tuple:
    """(training split, test split, "synthetic"), a pure function of config.split_seed."""
    rng = np.random.default_rng([config.split_seed, _STREAM])
    # Coarse 8x8-pixel colour blocks survive crops and flips, so a small CNN learns them fast.
    blocks = rng.integers(0, 256, (config.num_classes, 4, 4, CHANNELS)).astype(np.float32)
    prototypes = blocks.repeat(8, axis=1).repeat(8, axis=2)
    train = _samples(prototypes, config.synthetic_train_size, rng)
    test = _samples(prototypes, config.synthetic_test_size, rng)
    return train, test, "synthetic"

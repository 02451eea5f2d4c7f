"""ranet.data.pipeline: deterministic, resumable input pipelines over any number of replicas.

Labels are row ids here so that batches reveal which rows they hold.
"""

import numpy as np
import pytest
import tensorflow as tf

from ranet import data

N = 40
MEAN, STD = np.array([0.5, 0.4, 0.3], np.float32), np.array([0.2, 0.25, 0.3], np.float32)


def _id_split(num_examples: int = N) -> data.Split:
    images = np.random.default_rng(0).integers(0, 256, (num_examples, 32, 32, 3), dtype=np.uint8)
    return data.Split(images, np.arange(num_examples, dtype=np.int32))


def _context(pipelines: int = 1, pipeline_id: int = 0, replicas: int = 1):
    return tf.distribute.InputContext(num_input_pipelines=pipelines, input_pipeline_id=pipeline_id,
                                      num_replicas_in_sync=replicas)


def _take(dataset: tf.data.Dataset, count: int) -> list:
    return [tuple(t.numpy() for t in element) for element in dataset.take(count)]


def _train(split=None, global_batch_size=8, **kwargs):
    return data.train_input_fn(split or _id_split(), global_batch_size=global_batch_size,
                               mean=MEAN, std=STD, seed=kwargs.pop("seed", 5), **kwargs)


def _global_batches(fn, pipelines: int, replicas: int, steps: int) -> list:
    """Global batches rebuilt from every pipeline's per-replica batches, pipeline-major."""
    per_step = replicas // pipelines
    streams = [_take(fn(_context(pipelines, i, replicas)), steps * per_step)
               for i in range(pipelines)]
    return [tuple(np.concatenate([streams[i][s * per_step + r][k] for i in range(pipelines)
                                  for r in range(per_step)]) for k in range(2))
            for s in range(steps)]


def test_train_batches_have_shapes_and_dtypes():
    images, labels = _take(_train()(_context()), 1)[0]
    assert images.shape == (8, 32, 32, 3) and images.dtype == np.float32
    assert labels.shape == (8,) and labels.dtype == np.int32


@pytest.mark.parametrize("augment", [False, True])
@pytest.mark.parametrize("pipelines, replicas", [(2, 2), (1, 2), (2, 4)])
def test_pipeline_slices_make_up_the_global_batch(augment, pipelines, replicas):
    fn = _train(augment=augment)
    reference = _global_batches(fn, 1, 1, 6)
    for got, want in zip(_global_batches(fn, pipelines, replicas, 6), reference):
        np.testing.assert_array_equal(got[1], want[1])
        np.testing.assert_array_equal(got[0], want[0])


def test_epochs_are_permutations_in_different_orders():
    batches = _take(_train()(_context()), 10)  # 5 steps per epoch
    epochs = [np.concatenate([b[1] for b in batches[e * 5:(e + 1) * 5]]) for e in (0, 1)]
    assert sorted(epochs[0]) == sorted(epochs[1]) == list(range(N))
    assert not np.array_equal(epochs[0], epochs[1])


def test_uneven_split_drops_the_remainder():
    batches = _take(_train(_id_split(43))(_context()), 5)
    assert data.steps_per_epoch(43, 8) == 5
    assert len(np.unique(np.concatenate([b[1] for b in batches]))) == 40


@pytest.mark.parametrize("augment", [False, True])
@pytest.mark.parametrize("start_step", [3, 5, 7, 12])
def test_start_step_resumes_at_that_global_step(augment, start_step):
    full = _take(_train(augment=augment)(_context()), start_step + 3)
    resumed = _take(_train(augment=augment, start_step=start_step)(_context()), 3)
    for got, want in zip(resumed, full[start_step:]):
        np.testing.assert_array_equal(got[1], want[1])
        np.testing.assert_array_equal(got[0], want[0])


def _pixels(normalised: np.ndarray) -> np.ndarray:
    return np.rint((normalised * STD + MEAN) * 255).astype(np.int64)


@pytest.mark.parametrize("padding", [4, 2, 0])
def test_augmentation_is_a_pad_crop_flip_of_the_row(padding):
    split = _id_split()
    plain = _take(_train(split, augment=False)(_context()), 5)
    augmented = _take(_train(split, augment=True, crop_padding=padding)(_context()), 5)
    window = 2 * padding + 1
    changed, shifted = 0, 0
    for (_, labels), (images, aug_labels) in zip(plain, augmented):
        np.testing.assert_array_equal(labels, aug_labels)
        for row, image in zip(labels, _pixels(images)):
            original = split.images[row].astype(np.int64)
            padded = np.pad(original, [(padding, padding), (padding, padding), (0, 0)])
            crops = [crop for y in range(window) for x in range(window)
                     for crop in (padded[y:y + 32, x:x + 32], padded[y:y + 32, x:x + 32][:, ::-1])]
            assert any(np.array_equal(image, crop) for crop in crops)
            changed += not np.array_equal(image, original)
            shifted += not any(np.array_equal(image, o) for o in (original, original[:, ::-1]))
    if padding:
        assert shifted > N // 2
    else:  # Flips only: every image is its row or the row's mirror, and both occur.
        assert shifted == 0 and 0 < changed < N


def test_train_normalises_with_mean_and_std():
    split = _id_split()
    images, labels = _take(_train(split, augment=False)(_context()), 1)[0]
    expected = (split.images[labels] / 255.0 - MEAN) / STD
    np.testing.assert_allclose(images, expected, rtol=1e-5, atol=1e-5)


def test_train_rejects_bad_batch_sizes():
    with pytest.raises(data.DataError, match="divisible by the 3 replicas"):
        _train(global_batch_size=8)(_context(replicas=3))
    with pytest.raises(data.DataError, match="global_batch_size=41"):
        _train(global_batch_size=41)


@pytest.mark.parametrize("num_examples, pipelines, replicas", [(23, 1, 1), (23, 2, 2), (24, 1, 2)])
def test_eval_covers_every_example_once(num_examples, pipelines, replicas):
    split = _id_split(num_examples)
    fn = data.eval_input_fn(split, global_batch_size=4, mean=MEAN, std=STD)
    steps = data.num_eval_steps(num_examples, 4)
    streams = [_take(fn(_context(pipelines, i, replicas)), 100) for i in range(pipelines)]
    assert sum(len(s) for s in streams) == steps * replicas
    images, labels, weights = (np.concatenate([b[k] for s in streams for b in s]) for k in range(3))
    assert weights.dtype == np.float32 and weights.sum() == num_examples
    assert sorted(labels[weights == 1]) == list(range(num_examples))
    np.testing.assert_allclose(images, (split.images[labels] / 255.0 - MEAN) / STD, atol=1e-5)


def test_eval_slices_are_in_order():
    fn = data.eval_input_fn(_id_split(16), global_batch_size=8, mean=MEAN, std=STD)
    first = [_take(fn(_context(2, i, 2)), 1)[0][1] for i in range(2)]
    np.testing.assert_array_equal(np.concatenate(first), np.arange(8))



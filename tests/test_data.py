"""Tests for ranet.data: safe, validated loading and deterministic, resumable input pipelines."""

import codecs
import dataclasses
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from ranet import data
from ranet.config import DataConfig

ROWS = 20  # rows per fake batch file: the loader must not assume 10000


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    """No test downloads, nor sees the real Keras cache."""
    def refuse(name):
        raise OSError(f"test refused to download {name}")
    monkeypatch.setattr(data, "_download", refuse)
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras_home"))


def _rows(first_id: int, count: int) -> np.ndarray:
    """uint8 (count, 3072) rows whose first two bytes encode a unique row id."""
    rows = np.random.default_rng(first_id).integers(0, 256, (count, 3072), dtype=np.uint8)
    ids = np.arange(first_id, first_id + count)
    rows[:, 0], rows[:, 1] = ids // 256, ids % 256
    return rows


def _row_ids(images: np.ndarray) -> np.ndarray:
    """Inverse of ``_rows`` for NHWC images (byte 0 is R(0,0), byte 1 is R(0,1))."""
    return images[:, 0, 0, 0].astype(int) * 256 + images[:, 0, 1, 0]


def _write(path: Path, content, protocol: int = 2) -> Path:
    path.write_bytes(pickle.dumps(content, protocol=protocol))
    return path


def _batch(first_id: int, num_classes: int = 10, label_key: bytes = b"labels") -> dict:
    return {b"data": _rows(first_id, ROWS), label_key: [i % num_classes for i in range(ROWS)],
            b"batch_label": b"fake"}


def _fake_cifar10(parent: Path, with_test: bool = False) -> Path:
    folder = parent / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for i in range(5):
        _write(folder / f"data_batch_{i + 1}", _batch(i * ROWS))
    if with_test:
        _write(folder / "test_batch", _batch(1000), protocol=4)
    return folder


def _config(data_dir, **kwargs) -> DataConfig:
    return DataConfig(dataset=kwargs.pop("dataset", "cifar10"), data_dir=str(data_dir),
                      validation_size=kwargs.pop("validation_size", 10), **kwargs)


# --------------------------------------------------------------------------------------------
# Loading and file validation.

class _Exploit:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_restricted_unpickler_refuses_malicious_file(tmp_path):
    folder = _fake_cifar10(tmp_path)
    marker = tmp_path / "pwned"
    bad = _write(folder / "data_batch_2", {b"data": _Exploit(marker), b"labels": []})
    with pytest.raises(data.DataError, match="system") as err:
        data.load_splits(_config(tmp_path))
    assert str(bad) in str(err.value)
    assert not marker.exists()


class _OddCodec:
    def __reduce__(self):
        return codecs.encode, ("text", "rot13")


def test_only_latin1_codec_is_allowed(tmp_path):
    bad = _write(_fake_cifar10(tmp_path) / "data_batch_1", {b"data": _OddCodec(), b"labels": []})
    with pytest.raises(data.DataError, match="refused codec 'rot13'") as err:
        data.load_splits(_config(tmp_path))
    assert str(bad) in str(err.value)


def _truncate(path):
    path.write_bytes(path.read_bytes()[:1000])


@pytest.mark.parametrize("corrupt, message", [
    (_truncate, "truncated, corrupt"),
    (lambda p: _write(p, [1, 2, 3]), "dict"),
    (lambda p: _write(p, {b"data": _rows(0, ROWS)}), "lacks the key"),
    (lambda p: _write(p, {b"data": _rows(0, ROWS)[:, :3000], b"labels": [0] * ROWS}), "N x 3072"),
    (lambda p: _write(p, {b"data": _rows(0, ROWS).astype(np.float32), b"labels": [0] * ROWS}),
     "integer pixels"),
    (lambda p: _write(p, {b"data": _rows(0, ROWS), b"labels": [0] * (ROWS - 1)}), "labels for"),
    (lambda p: _write(p, {b"data": _rows(0, ROWS), b"labels": [10] * ROWS}), r"\[0, 10\)"),
    (lambda p: p.unlink(), "is missing"),
])
def test_bad_batch_file_raises_data_error_naming_it(tmp_path, corrupt, message):
    path = _fake_cifar10(tmp_path) / "data_batch_3"
    corrupt(path)
    with pytest.raises(data.DataError, match=message) as err:
        data.load_splits(_config(tmp_path))
    assert str(path) in str(err.value)


def test_cifar10_loads_nhwc_with_correct_pixel_order(tmp_path):
    folder = _fake_cifar10(tmp_path)
    batch = _batch(0)
    # Planar rows: R plane, then G, then B; set pixel (y=1, x=2) of row 0.
    for channel, value in enumerate((200, 100, 50)):
        batch[b"data"][0, channel * 1024 + 1 * 32 + 2] = value
    _write(folder / "data_batch_1", batch)
    splits = data.load_splits(_config(tmp_path, validation_size=0))
    assert splits.train.images.shape == (5 * ROWS, 32, 32, 3)
    assert splits.train.images.dtype == np.uint8 and splits.train.labels.dtype == np.int32
    np.testing.assert_array_equal(splits.train.images[0, 1, 2], [200, 100, 50])
    np.testing.assert_array_equal(_row_ids(splits.train.images), np.arange(5 * ROWS))
    assert splits.num_classes == 10 and splits.name == "cifar10"
    assert splits.mean.shape == splits.std.shape == (3,) and splits.mean.dtype == np.float32
    assert np.all((0.4 < splits.mean) & (splits.mean < 0.6))  # 0..1 units, uniform pixels


def test_data_dir_may_be_parent_or_folder(tmp_path):
    folder = _fake_cifar10(tmp_path)
    from_parent = data.load_splits(_config(tmp_path))
    from_folder = data.load_splits(_config(folder))
    np.testing.assert_array_equal(from_parent.train.images, from_folder.train.images)
    assert from_parent.source == from_folder.source == str(folder)


def test_missing_data_dir_says_to_pass_data_dir(tmp_path):
    with pytest.raises(data.DataError, match="--data_dir") as err:
        data.load_splits(_config(tmp_path / "nowhere"))
    assert str(tmp_path / "nowhere") in str(err.value)


def test_missing_test_file_is_none_until_required(tmp_path):
    folder = _fake_cifar10(tmp_path)
    splits = data.load_splits(_config(tmp_path))
    assert splits.test is None
    assert data.require_split(splits, "train") is splits.train
    with pytest.raises(data.DataError, match="test split is missing") as err:
        data.require_split(splits, "test")
    assert str(folder) in str(err.value)


def test_test_file_is_loaded_when_present(tmp_path):
    _fake_cifar10(tmp_path, with_test=True)
    test = data.require_split(data.load_splits(_config(tmp_path)), "test")
    np.testing.assert_array_equal(_row_ids(test.images), 1000 + np.arange(ROWS))


@pytest.mark.parametrize("layout", ["cifar-10-batches-py",
                                    "cifar-10-batches-py-target/cifar-10-batches-py"])
def test_keras_cache_is_searched_without_data_dir(tmp_path, layout):
    folder = tmp_path / "keras_home/datasets" / layout
    _fake_cifar10(folder.parent)
    splits = data.load_splits(DataConfig(validation_size=0))
    assert splits.source == str(folder) and len(splits.train) == 5 * ROWS


def test_failed_download_says_so(tmp_path):
    with pytest.raises(data.DataError, match="download .* failed.*--data_dir"):
        data.load_splits(DataConfig())


def test_cifar100_reads_fine_labels(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    _write(folder / "train", _batch(0, num_classes=100, label_key=b"fine_labels") |
           {b"coarse_labels": [0] * ROWS})
    _write(folder / "test", _batch(500, num_classes=100, label_key=b"fine_labels"), protocol=5)
    splits = data.load_splits(_config(tmp_path, dataset="cifar100", validation_size=0))
    assert splits.num_classes == 100 and len(splits.train) == len(splits.test) == ROWS
    np.testing.assert_array_equal(splits.train.labels, np.arange(ROWS))


# --------------------------------------------------------------------------------------------
# Validation split and synthetic data.

@pytest.mark.parametrize("validation_size", [10, 15, 0])
def test_validation_split_is_balanced_disjoint_and_deterministic(tmp_path, validation_size):
    _fake_cifar10(tmp_path)
    config = _config(tmp_path, validation_size=validation_size, split_seed=3)
    splits = data.load_splits(config)
    train_ids, val_ids = _row_ids(splits.train.images), _row_ids(splits.validation.images)
    assert len(val_ids) == validation_size and len(train_ids) == 5 * ROWS - validation_size
    assert sorted(np.concatenate([train_ids, val_ids]).tolist()) == list(range(5 * ROWS))
    per_class = np.bincount(splits.validation.labels, minlength=10)
    assert per_class.max() - per_class.min() <= (validation_size % 10 > 0)
    np.testing.assert_array_equal(val_ids, _row_ids(data.load_splits(config).validation.images))
    np.testing.assert_array_equal(np.diff(train_ids) > 0, True)  # file order is kept


def test_validation_split_depends_on_seed(tmp_path):
    _fake_cifar10(tmp_path)
    ids = [_row_ids(data.load_splits(_config(tmp_path, split_seed=s)).validation.images)
           for s in (0, 1)]
    assert not np.array_equal(*ids)


def test_validation_size_must_leave_training_images(tmp_path):
    _fake_cifar10(tmp_path)
    with pytest.raises(data.DataError, match="validation_size=100"):
        data.load_splits(_config(tmp_path, validation_size=5 * ROWS))


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


# --------------------------------------------------------------------------------------------
# Input pipelines. Labels are row ids here so that batches reveal which rows they hold.

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


def test_augmentation_is_a_pad_crop_flip_of_the_row():
    split = _id_split()
    plain = _take(_train(split, augment=False)(_context()), 5)
    augmented = _take(_train(split, augment=True)(_context()), 5)
    changed = 0
    for (_, labels), (images, aug_labels) in zip(plain, augmented):
        np.testing.assert_array_equal(labels, aug_labels)
        for row, image in zip(labels, _pixels(images)):
            padded = np.pad(split.images[row].astype(np.int64), [(4, 4), (4, 4), (0, 0)])
            crops = [crop for y in range(9) for x in range(9)
                     for crop in (padded[y:y + 32, x:x + 32], padded[y:y + 32, x:x + 32][:, ::-1])]
            assert any(np.array_equal(image, crop) for crop in crops)
            changed += not np.array_equal(image, split.images[row])
    assert changed > N // 2


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

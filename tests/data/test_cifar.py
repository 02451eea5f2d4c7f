"""ranet.data.cifar: safe, validated loading of the CIFAR files, and the validation hold-out."""

import codecs
import os
import pickle
from pathlib import Path

import numpy as np
import pytest

from ranet import data
from ranet.data import cifar
from ranet.config import DataConfig

ROWS = 20  # rows per fake batch file: the loader must not assume 10000


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    """No test downloads, nor sees the real Keras cache."""
    def refuse(name):
        raise OSError(f"test refused to download {name}")
    monkeypatch.setattr(cifar, "_download", refuse)
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




def test_test_size_holds_a_balanced_test_split_out_of_train(tmp_path):
    _fake_cifar10(tmp_path)
    config = _config(tmp_path, validation_size=10, test_size=20)
    splits = data.load_splits(config)
    ids = [_row_ids(s.images) for s in (splits.train, splits.validation, splits.test)]
    assert [len(i) for i in ids] == [5 * ROWS - 30, 10, 20]
    assert sorted(np.concatenate(ids).tolist()) == list(range(5 * ROWS))   # disjoint, complete
    assert np.bincount(splits.test.labels, minlength=10).tolist() == [2] * 10
    np.testing.assert_array_equal(ids[2], _row_ids(data.load_splits(config).test.images))
    # The test split is not what the validation split of the same seed would have been.
    assert not np.array_equal(ids[2], _row_ids(data.load_splits(
        _config(tmp_path, validation_size=20)).validation.images))


def test_test_size_is_refused_where_the_folder_has_a_test_file(tmp_path):
    _fake_cifar10(tmp_path, with_test=True)
    with pytest.raises(data.DataError, match="has its own test split.*Drop --test_size"):
        data.load_splits(_config(tmp_path, test_size=20))
    _fake_cifar10(tmp_path / "no_test")
    with pytest.raises(data.DataError, match="together take all"):
        data.load_splits(_config(tmp_path / "no_test", validation_size=10, test_size=5 * ROWS))

"""CIFAR-10/100 in the official python-pickle layout: finding the folder and reading it safely.

The batch files are untrusted input: a restricted unpickler admits only what a pickled numpy
array needs, so a crafted file cannot run code, and every array is checked before use.
``load(config)`` returns (the full training split, the test split or None, the folder).
"""

import os
import pickle
from pathlib import Path
from typing import Optional

import keras
import numpy as np

from ranet.data.splits import CHANNELS, DataError, Split

IMAGE_SIZE = 32
_ROW_SIZE = IMAGE_SIZE * IMAGE_SIZE * CHANNELS

# Where each dataset lives once extracted, and what the folder holds.
_FOLDERS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}
TRAIN_FILES = {"cifar10": tuple(f"data_batch_{i}" for i in range(1, 6)), "cifar100": ("train",)}
TEST_FILES = {"cifar10": "test_batch", "cifar100": "test"}
_LABEL_KEYS = {"cifar10": "labels", "cifar100": "fine_labels"}
_URLS = {"cifar10": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
         "cifar100": "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"}


def _latin1_encode(text: str, encoding: str) -> bytes:
    """Python 3 writes bytes at pickle protocol 2 as ``_codecs.encode(text, "latin1")``.

    Only that one codec is honoured, so the global cannot reach any other codec machinery.
    """
    if encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"refused codec {encoding!r} in _codecs.encode")
    return text.encode("latin1")


def _allowed_globals() -> dict:
    """The only globals a pickled numpy array needs, taken from numpy itself.

    Reading them off live objects (instead of importing by name) covers numpy 1 and 2, whose
    private module moved from ``numpy.core`` to ``numpy._core``.
    """
    reconstruct = np.zeros(1).__reduce__()[0]
    scalar = np.float64(0).__reduce__()[0]
    frombuffer = np.zeros(1).__reduce_ex__(5)[0]  # protocol-5 pickles of contiguous arrays
    allowed = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype,
               ("_codecs", "encode"): _latin1_encode}
    for module in ("numpy.core", "numpy._core"):
        allowed[(f"{module}.multiarray", "_reconstruct")] = reconstruct
        allowed[(f"{module}.multiarray", "scalar")] = scalar
        allowed[(f"{module}.numeric", "_frombuffer")] = frombuffer
    return allowed


_ALLOWED_GLOBALS = _allowed_globals()


class _RestrictedUnpickler(pickle.Unpickler):
    """Refuses every global but numpy array reconstruction: the files are untrusted input."""

    def __init__(self, file, path: Path):
        super().__init__(file, encoding="bytes")
        self._path = path

    def find_class(self, module, name):
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise DataError(
                f"{self._path} asks to load the Python global {module}.{name}, which a CIFAR "
                "batch never needs; refusing to unpickle it (the file may be malicious). "
                "Replace it with a fresh copy from the official archive. "
                f"Received: {module}.{name}") from None


def _unpickle(path: Path) -> dict:
    """Reads one batch file as a dict with str keys."""
    if not path.is_file():
        raise DataError(f"{path} is missing. Re-extract the dataset archive so the folder is "
                        f"complete, or pass --data_dir pointing at a complete copy. "
                        f"Received: {path}")
    try:
        with open(path, "rb") as f:
            content = _RestrictedUnpickler(f, path).load()
    except DataError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError,
            IndexError, KeyError, OSError, MemoryError) as err:
        raise DataError(f"{path} is not a readable CIFAR pickle (truncated, corrupt or "
                        f"unsafe). Replace it with a fresh copy from the official archive. "
                        f"Received: {type(err).__name__}: {err}") from err
    if not isinstance(content, dict):
        raise DataError(f"{path} should hold a dict of arrays but holds a "
                        f"{type(content).__name__}. Received: {type(content).__name__}")
    # Python 2 pickles read with encoding="bytes" have bytes keys; Python 3 ones have str.
    return {k.decode("utf-8", "replace") if isinstance(k, bytes) else k: v
            for k, v in content.items()}


def _checked_data(path: Path, data) -> np.ndarray:
    """The b"data" entry as uint8 (N, 3072), or a DataError."""
    data = np.asarray(data)
    if data.ndim != 2 or data.shape[1] != _ROW_SIZE:
        raise DataError(f"{path}: b'data' must be N x {_ROW_SIZE} (32x32 RGB rows). "
                        f"The file is malformed; replace it. Received: shape {data.shape}")
    if data.dtype != np.uint8:
        is_integer = np.issubdtype(data.dtype, np.integer)
        if not is_integer or (data.size and (data.min() < 0 or data.max() > 255)):
            raise DataError(f"{path}: b'data' must hold integer pixels in 0..255. The file is "
                            f"malformed; replace it. Received: dtype {data.dtype}")
    return data.astype(np.uint8, copy=False)


def _checked_labels(path: Path, labels, num_rows: int, num_classes: int) -> np.ndarray:
    """Labels as int32 (N,), or a DataError."""
    labels = np.asarray(labels)
    if labels.ndim != 1 or not (labels.size == 0 or np.issubdtype(labels.dtype, np.integer)):
        raise DataError(f"{path}: labels must be a flat list of integers. The file is "
                        f"malformed; replace it. Received: shape {labels.shape}, "
                        f"dtype {labels.dtype}")
    if len(labels) != num_rows:
        raise DataError(f"{path}: {len(labels)} labels for {num_rows} images; they must match. "
                        f"The file is malformed; replace it. Received: {len(labels)} labels")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(f"{path}: labels must lie in [0, {num_classes}). The file is malformed "
                        f"or belongs to another dataset. Received: min {labels.min()}, "
                        f"max {labels.max()}")
    return labels.astype(np.int32)


def _load_batch(path: Path, label_key: str, num_classes: int) -> Split:
    """One CIFAR batch file as a validated NHWC split."""
    content = _unpickle(path)
    missing = [key for key in ("data", label_key) if key not in content]
    if missing:
        raise DataError(f"{path} lacks the key(s) {missing}: it is not a CIFAR batch of this "
                        f"dataset. Received keys: {sorted(map(str, content))}")
    data = _checked_data(path, content["data"])
    labels = _checked_labels(path, content[label_key], len(data), num_classes)
    # Rows are planar R, G, B planes of 32x32.
    images = data.reshape(-1, CHANNELS, IMAGE_SIZE, IMAGE_SIZE).transpose(0, 2, 3, 1)
    return Split(np.ascontiguousarray(images), labels)


def _concat(splits) -> Split:
    return Split(np.concatenate([s.images for s in splits]),
                 np.concatenate([s.labels for s in splits]))


# --------------------------------------------------------------------------------------------
# Finding the files.

def _keras_cache() -> Path:
    """Keras's dataset cache, read at call time so KERAS_HOME set after import counts."""
    return Path(os.environ.get("KERAS_HOME", "~/.keras")).expanduser() / "datasets"


def _download(name: str) -> Path:
    """Downloads and extracts a dataset into the Keras cache; returns its extracted folder."""
    folder = _FOLDERS[name]
    # Same cache name as keras.datasets, so either one reuses the other's download.
    extracted = keras.utils.get_file(fname=f"{folder}-target", origin=_URLS[name], extract=True,
                                     cache_dir=str(_keras_cache().parent))
    return Path(extracted) / folder


def _is_dataset_folder(path: Path, name: str) -> bool:
    return path.is_dir() and (path.name == _FOLDERS[name] or
                              (path / TRAIN_FILES[name][0]).is_file())


def _folder_from_data_dir(data_dir: str, name: str) -> Path:
    """``data_dir`` may be the extracted folder itself or the folder that contains it."""
    path = Path(data_dir).expanduser()
    folder = _FOLDERS[name]
    for candidate in (path / folder, path):
        if _is_dataset_folder(candidate, name):
            return candidate
    raise DataError(f"No {name} data at {path}: expected {path / folder} or a {folder} folder "
                    f"holding {TRAIN_FILES[name][0]}. Pass --data_dir pointing at the extracted "
                    f"{folder} folder (or the folder that contains it). "
                    f"Received: data_dir={data_dir}")


def _find_folder(data_dir: Optional[str], name: str) -> Path:
    """The extracted dataset folder: from data_dir, else the Keras cache, else a download."""
    if data_dir is not None:
        return _folder_from_data_dir(data_dir, name)
    cache = _keras_cache()
    folder = _FOLDERS[name]
    for candidate in (cache / folder, cache / f"{folder}-target" / folder):
        if _is_dataset_folder(candidate, name):
            return candidate
    try:
        return _download(name)
    except Exception as err:  # get_file reports offline/HTTP/extraction failures as Exception
        raise DataError(f"No {name} data was found in the Keras cache {cache} and the download "
                        f"from {_URLS[name]} failed. Pass --data_dir pointing at the extracted "
                        f"{folder} folder. Received: {type(err).__name__}: {err}") from err


def load(config) -> tuple:
    """(full training split, test split or None, source folder) of cifar10/cifar100."""
    name = config.dataset
    folder = _find_folder(config.data_dir, name)
    label_key, num_classes = _LABEL_KEYS[name], config.num_classes
    train = _concat([_load_batch(folder / f, label_key, num_classes)
                     for f in TRAIN_FILES[name]])
    test_path = folder / TEST_FILES[name]
    test = _load_batch(test_path, label_key, num_classes) if test_path.exists() else None
    return train, test, str(folder)



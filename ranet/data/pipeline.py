"""CIFAR-10/100 and synthetic images: host-side loading and deterministic tf.data pipelines.

Loading (numpy) turns a ``DataConfig`` into ``DataSplits``: uint8 NHWC images, int32 labels,
a class-balanced validation split held out of the training set, and per-channel statistics.

Normalisation units: ``DataSplits.mean`` and ``DataSplits.std`` are in 0..1 units (pixel / 255),
computed over the train split (after the validation hold-out). The input functions feed the
model ``(pixel / 255 - mean) / std`` as float32.

The input functions are built for ``strategy.distribute_datasets_from_function``: every global
batch is a fixed function of (seed, step), and each input pipeline reads its own contiguous
slice of it, so training is reproducible, resumable at any step, and independent of how many
pipelines or replicas share the work.
"""

import dataclasses
import math
import os
import pickle
from pathlib import Path
from typing import Callable, Optional

import keras
import numpy as np
import tensorflow as tf

IMAGE_SIZE = 32
CHANNELS = 3
_ROW_SIZE = IMAGE_SIZE * IMAGE_SIZE * CHANNELS
_PAD = 4

# Where each dataset lives once extracted, and what the folder holds.
_FOLDERS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}
_TRAIN_FILES = {"cifar10": tuple(f"data_batch_{i}" for i in range(1, 6)), "cifar100": ("train",)}
_TEST_FILES = {"cifar10": "test_batch", "cifar100": "test"}
_LABEL_KEYS = {"cifar10": "labels", "cifar100": "fine_labels"}
_URLS = {"cifar10": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
         "cifar100": "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"}

# Independent random streams derived from one user seed.
_SYNTHETIC_STREAM = 0
_SHUFFLE_STREAM = 1
_AUGMENT_STREAM = 2
# Pinned rather than "auto_select" so that every host and device kind draws the same numbers.
_RNG_ALG = "philox"


class DataError(ValueError):
    """The data could not be found, or a data file is missing, unsafe or malformed."""


@dataclasses.dataclass(frozen=True, eq=False)
class Split:
    """Images uint8 (N, 32, 32, 3) and labels int32 (N,)."""
    images: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)


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


# --------------------------------------------------------------------------------------------
# Safe unpickling and file validation.

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
                              (path / _TRAIN_FILES[name][0]).is_file())


def _folder_from_data_dir(data_dir: str, name: str) -> Path:
    """``data_dir`` may be the extracted folder itself or the folder that contains it."""
    path = Path(data_dir).expanduser()
    folder = _FOLDERS[name]
    for candidate in (path / folder, path):
        if _is_dataset_folder(candidate, name):
            return candidate
    raise DataError(f"No {name} data at {path}: expected {path / folder} or a {folder} folder "
                    f"holding {_TRAIN_FILES[name][0]}. Pass --data_dir pointing at the extracted "
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


def _load_cifar(config) -> tuple:
    """(full training split, test split or None, source folder) of cifar10/cifar100."""
    name = config.dataset
    folder = _find_folder(config.data_dir, name)
    label_key, num_classes = _LABEL_KEYS[name], config.num_classes
    train = _concat([_load_batch(folder / f, label_key, num_classes)
                     for f in _TRAIN_FILES[name]])
    test_path = folder / _TEST_FILES[name]
    test = _load_batch(test_path, label_key, num_classes) if test_path.exists() else None
    return train, test, str(folder)


# --------------------------------------------------------------------------------------------
# Synthetic data.

def _synthetic_samples(prototypes: np.ndarray, size: int, rng: np.random.Generator) -> Split:
    """Balanced samples: class prototype plus pixel noise."""
    num_classes = len(prototypes)
    labels = rng.permutation(np.arange(size) % num_classes).astype(np.int32)
    noise = rng.standard_normal((size, IMAGE_SIZE, IMAGE_SIZE, CHANNELS), dtype=np.float32)
    images = np.clip(prototypes[labels] + 32.0 * noise, 0, 255).astype(np.uint8)
    return Split(images, labels)


def _load_synthetic(config) -> tuple:
    """(training split, test split, "synthetic"), a pure function of config.split_seed."""
    rng = np.random.default_rng([config.split_seed, _SYNTHETIC_STREAM])
    # Coarse 8x8-pixel colour blocks survive crops and flips, so a small CNN learns them fast.
    blocks = rng.integers(0, 256, (config.num_classes, 4, 4, CHANNELS)).astype(np.float32)
    prototypes = blocks.repeat(8, axis=1).repeat(8, axis=2)
    train = _synthetic_samples(prototypes, config.synthetic_train_size, rng)
    test = _synthetic_samples(prototypes, config.synthetic_test_size, rng)
    return train, test, "synthetic"


# --------------------------------------------------------------------------------------------
# Validation hold-out and statistics.

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


def _hold_out(full: Split, size: int, num_classes: int, seed: int) -> tuple:
    """(train, validation): a class-balanced random validation split; both keep file order."""
    if size >= len(full):
        raise DataError(f"validation_size must be smaller than the {len(full)} training images, "
                        f"or nothing is left to train on. Pass a smaller --validation_size. "
                        f"Received: validation_size={size}")
    # One uniform key per row: per-class picks are the smallest keys, reproducible from seed.
    keys = np.random.default_rng(seed).random(len(full))
    quotas = _class_quotas(np.bincount(full.labels, minlength=num_classes), size)
    picked = []
    for label, quota in enumerate(quotas):
        rows = np.flatnonzero(full.labels == label)
        picked.append(rows[np.argsort(keys[rows], kind="stable")[:quota]])
    is_validation = np.zeros(len(full), bool)
    is_validation[np.concatenate(picked)] = True
    return _subset(full, ~is_validation), _subset(full, is_validation)


def _subset(split: Split, mask: np.ndarray) -> Split:
    return Split(split.images[mask], split.labels[mask])


def _channel_stats(images: np.ndarray) -> tuple:
    """Per-channel mean and std in 0..1 units, exact, via pixel-value histograms."""
    values = np.arange(256, dtype=np.float64) / 255.0
    means, stds = [], []
    for channel in range(CHANNELS):
        counts = np.bincount(images[..., channel].ravel(), minlength=256)
        mean = counts @ values / counts.sum()
        means.append(mean)
        stds.append(math.sqrt(counts @ (values - mean) ** 2 / counts.sum()))
    return np.array(means, np.float32), np.array(stds, np.float32)


# --------------------------------------------------------------------------------------------
# Public loading API.

def load_splits(config) -> DataSplits:
    """Loads ``config.dataset`` and holds out ``config.validation_size`` training images."""
    loader = _load_synthetic if config.dataset == "synthetic" else _load_cifar
    full_train, test, source = loader(config)
    train, validation = _hold_out(full_train, config.validation_size, config.num_classes,
                                  config.split_seed)
    mean, std = _channel_stats(train.images)
    return DataSplits(name=config.dataset, train=train, validation=validation, test=test,
                      num_classes=config.num_classes, mean=mean, std=std, source=source)


def require_split(splits: DataSplits, name: str) -> Split:
    """The split called ``name`` ("train", "validation" or "test"); DataError if absent."""
    if name not in ("train", "validation", "test"):
        raise DataError(f"Unknown split; use train, validation or test. Received: {name!r}")
    split = getattr(splits, name)
    if split is None:
        raise DataError(f"The {name} split is missing from {splits.source}: it has no "
                        f"{_TEST_FILES.get(splits.name, name)} file. Evaluate on the validation "
                        f"split, or pass --data_dir pointing at a folder that has the test file. "
                        f"Received: split={name!r}")
    return split


def split_in_two(split: Split, num_classes: int, seed: int) -> tuple:
    """Two disjoint, class-balanced halves of a split, reproducible from ``seed``.

    The eval binary calibrates exit thresholds on one half of the validation
    split and reports on the other when no test split is asked for.
    """
    return _hold_out(split, len(split) // 2, num_classes, seed)


def normalized(images: np.ndarray, mean, std) -> np.ndarray:
    """uint8 images -> the float32 inputs the models were trained on (the pipelines' formula)."""
    return ((images.astype(np.float32) / 255.0 - np.asarray(mean, np.float32))
            / np.asarray(std, np.float32))


# --------------------------------------------------------------------------------------------
# tf.data input functions.

def steps_per_epoch(num_examples: int, global_batch_size: int) -> int:
    """Full global batches per epoch; the remainder is dropped, so it must be at least one."""
    if global_batch_size <= 0 or global_batch_size > num_examples:
        raise DataError(f"global_batch_size must be in [1, {num_examples}] (the number of "
                        f"training examples). Pass a smaller --batch_size or use more data. "
                        f"Received: global_batch_size={global_batch_size}")
    return num_examples // global_batch_size


def num_eval_steps(num_examples: int, global_batch_size: int) -> int:
    """Global batches for one evaluation pass; the last one is padded."""
    if global_batch_size <= 0:
        raise DataError(f"global_batch_size must be positive. "
                        f"Received: global_batch_size={global_batch_size}")
    return -(-num_examples // global_batch_size)


def _slice_sizes(ctx: tf.distribute.InputContext, global_batch_size: int) -> tuple:
    """(rows per pipeline per global batch, rows per replica batch), after checking they divide."""
    replicas, pipelines = ctx.num_replicas_in_sync, ctx.num_input_pipelines
    if global_batch_size % replicas or replicas % pipelines:
        raise DataError(f"global_batch_size must be divisible by the {replicas} replicas in "
                        f"sync, and the replicas by the {pipelines} input pipelines. Pass a "
                        f"--batch_size that is a multiple of {replicas}. "
                        f"Received: global_batch_size={global_batch_size}")
    return global_batch_size // pipelines, ctx.get_per_replica_batch_size(global_batch_size)


def _stream_seed(seed: int, stream: int, epoch) -> tf.Tensor:
    """A stateless seed for one (seed, stream, epoch)."""
    base = tf.constant([seed, stream], tf.int64)
    return tf.random.experimental.stateless_fold_in(base, tf.cast(epoch, tf.int64), alg=_RNG_ALG)


def _normalise(images: tf.Tensor, mean, std) -> tf.Tensor:
    mean = tf.constant(np.asarray(mean, np.float32))
    std = tf.constant(np.asarray(std, np.float32))
    return (tf.cast(images, tf.float32) / 255.0 - mean) / std


def _crop_and_flip(images: tf.Tensor, offsets: tf.Tensor, flips: tf.Tensor) -> tf.Tensor:
    """Zero-pads by 4, takes the 32x32 window at ``offsets`` (B, 2), mirrors rows where flips."""
    padded = tf.pad(images, [[0, 0], [_PAD, _PAD], [_PAD, _PAD], [0, 0]])
    span = tf.range(IMAGE_SIZE)
    ys = offsets[:, :1] + span
    # Reading the window's columns right to left is the flip, in the same gather.
    xs = offsets[:, 1:] + tf.where(flips[:, None] > 0, IMAGE_SIZE - 1 - span, span)
    rows = tf.gather(padded, ys, axis=1, batch_dims=1)
    return tf.gather(rows, xs, axis=2, batch_dims=1)


def _pipeline_rows(global_rows: tf.Tensor, ctx, rows_per_pipeline: int,
                   per_replica: int) -> tf.Tensor:
    """(steps, G) global batches -> (steps * k, B) replica batches of this pipeline's slice."""
    start = ctx.input_pipeline_id * rows_per_pipeline
    mine = global_rows[:, start:start + rows_per_pipeline]
    return tf.reshape(mine, [-1, per_replica])


def train_input_fn(split: Split, *, global_batch_size: int, mean, std, seed: int,
                   augment: bool = True,
                   start_step: int = 0) -> Callable[[tf.distribute.InputContext], tf.data.Dataset]:
    """An infinite, shuffled, resumable training pipeline: yields (images f32, labels i32).

    Global step s is batch s % steps_per_epoch of epoch s // steps_per_epoch; epoch e reads the
    rows of a permutation drawn from (seed, e), and augmentation of a row is drawn from
    (seed, e, row), so a step's pixels do not depend on the number of pipelines.
    """
    num_examples = len(split)
    steps = steps_per_epoch(num_examples, global_batch_size)
    if start_step < 0:
        raise DataError(f"start_step must be >= 0. Received: start_step={start_step}")
    start_epoch, start_offset = divmod(start_step, steps)

    def input_fn(ctx: tf.distribute.InputContext) -> tf.data.Dataset:
        rows_per_pipeline, per_replica = _slice_sizes(ctx, global_batch_size)
        batches_per_step = rows_per_pipeline // per_replica
        images, labels = tf.constant(split.images), tf.constant(split.labels)

        def epoch_plan(epoch):
            """This pipeline's replica batches of one epoch: row ids and augmentation draws."""
            order = tf.random.experimental.stateless_shuffle(
                tf.range(num_examples), _stream_seed(seed, _SHUFFLE_STREAM, epoch), alg=_RNG_ALG)
            global_rows = tf.reshape(order[:steps * global_batch_size], [steps, global_batch_size])
            rows = _pipeline_rows(global_rows, ctx, rows_per_pipeline, per_replica)
            first = tf.where(epoch == start_epoch, start_offset, 0) * batches_per_step
            plan = {"rows": rows[first:]}
            if augment:
                # One draw per row of the whole split, so a row's draw is fixed by (seed, epoch).
                offset_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(
                    _stream_seed(seed, _AUGMENT_STREAM, epoch), 2, alg=_RNG_ALG))
                offsets = tf.random.stateless_uniform([num_examples, 2], offset_seed, 0,
                                                      2 * _PAD + 1, tf.int32, alg=_RNG_ALG)
                flips = tf.random.stateless_uniform([num_examples], flip_seed, 0, 2, tf.int32,
                                                    alg=_RNG_ALG)
                plan["offsets"] = tf.gather(offsets, plan["rows"])
                plan["flips"] = tf.gather(flips, plan["rows"])
            return tf.data.Dataset.from_tensor_slices(plan)

        def make_batch(plan):
            batch = tf.gather(images, plan["rows"])
            if augment:
                batch = _crop_and_flip(batch, plan["offsets"], plan["flips"])
            return _normalise(batch, mean, std), tf.gather(labels, plan["rows"])

        dataset = tf.data.Dataset.counter(start_epoch).flat_map(epoch_plan)
        dataset = dataset.map(make_batch, num_parallel_calls=tf.data.AUTOTUNE)
        return dataset.prefetch(tf.data.AUTOTUNE)

    return input_fn


def eval_input_fn(split: Split, *, global_batch_size: int, mean,
                  std) -> Callable[[tf.distribute.InputContext], tf.data.Dataset]:
    """One in-order pass, padded to whole global batches: yields (images, labels, weights).

    Padding rows repeat row 0 with weight 0, so weighted metrics count every example once.
    """
    num_examples = len(split)
    if num_examples == 0:
        raise DataError("The split to evaluate is empty. Evaluate another split, or set "
                        "--validation_size > 0 to evaluate on validation. Received: 0 examples")
    steps = num_eval_steps(num_examples, global_batch_size)
    padded = np.arange(steps * global_batch_size)
    weights = (padded < num_examples).astype(np.float32)
    padded[num_examples:] = 0

    def input_fn(ctx: tf.distribute.InputContext) -> tf.data.Dataset:
        rows_per_pipeline, per_replica = _slice_sizes(ctx, global_batch_size)
        images, labels = tf.constant(split.images), tf.constant(split.labels)
        plan = {name: _pipeline_rows(tf.reshape(values, [steps, global_batch_size]), ctx,
                                     rows_per_pipeline, per_replica)
                for name, values in (("rows", padded), ("weights", weights))}

        def make_batch(plan):
            return (_normalise(tf.gather(images, plan["rows"]), mean, std),
                    tf.gather(labels, plan["rows"]), plan["weights"])

        dataset = tf.data.Dataset.from_tensor_slices(plan)
        dataset = dataset.map(make_batch, num_parallel_calls=tf.data.AUTOTUNE)
        return dataset.prefetch(tf.data.AUTOTUNE)

    return input_fn

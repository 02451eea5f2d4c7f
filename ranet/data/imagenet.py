"""ImageNet from the standard TFRecord shards: listing, indexing, hold-out, transforms, pipelines.

The shards are those the TensorFlow ImageNet conversion scripts write: ``train-*-of-*`` and
``validation-*-of-*``, each record a ``tf.train.Example`` with ``image/encoded`` (JPEG) and
``image/class/label`` (1..1000). Labels here are 0-based.

The images do not fit in memory, so unlike CIFAR the pipelines stream from the shards:

* ``index_records`` reads every record's label once (and checks the record; the index is
  cached per set of shards), giving each record a global position in (sorted file, record)
  order; the validation hold-out is a class-balanced seeded pick over those positions, by
  the same rule as CIFAR's (``splits.hold_out``), and the pipelines filter on it.
* Training: files sharded per input pipeline (one per worker under
  MultiWorkerMirroredStrategy), interleaved and read in parallel, shuffled, and cropped by
  a fused ``decode_and_crop_jpeg`` random-resized crop (scale 0.08-1, ratio 3/4-4/3) to 224,
  flipped, normalised. ``deterministic`` fixes the order and the crops from the seed.
* Evaluation: the shorter side resized to 256, the centre 224x224 cropped.
"""

import contextlib
import dataclasses
import glob
import hashlib
import os
import tempfile
import zipfile
from typing import List, Optional, Sequence, Tuple

import numpy as np
import tensorflow as tf
from absl import logging

from ranet.data.pipeline import num_eval_steps, slice_sizes, steps_per_epoch
from ranet.data.splits import (DataError, DataSplits, Split, held_out_mask, normalize,
                               sample_mask)

NUM_CLASSES = 1000
IMAGE_SIZE = 224
EVAL_RESIZE = 256
# The usual ImageNet statistics (pixel / 255 units), as torchvision and the reference use them.
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
SHARD_PATTERNS = {"train": "train-*-of-*", "validation": "validation-*-of-*"}
CROP_AREA = (0.08, 1.0)
CROP_ASPECT = (3 / 4, 4 / 3)
_FEATURES = {"image/encoded": tf.io.FixedLenFeature([], tf.string),
             "image/class/label": tf.io.FixedLenFeature([], tf.int64)}
_JPEG_MAGIC = b"\xff\xd8\xff"
_SHUFFLE_BUFFER = 10_000
# Records parsed at once while indexing.
_INDEX_BATCH = 1024


def shard_files(data_dir: str, split: str) -> List[str]:
    """The sorted shards of ``split`` ("train" or "validation") in ``data_dir``."""
    if split not in SHARD_PATTERNS:
        raise DataError(f"split must be train or validation. Received: split={split!r}")
    if not data_dir or not os.path.isdir(data_dir):
        raise DataError(f"--data_dir={data_dir} is not a folder; pass the folder holding the "
                        "ImageNet TFRecord shards (train-*-of-*, validation-*-of-*).")
    files = sorted(glob.glob(os.path.join(data_dir, SHARD_PATTERNS[split])))
    if not files:
        raise DataError(f"{data_dir} has no {SHARD_PATTERNS[split]} TFRecord shards; convert "
                        "ImageNet with TensorFlow's build_imagenet_data.py (or pass the folder "
                        "that holds them).")
    return files


@dataclasses.dataclass(frozen=True)
class RecordIndex:
    """Every usable record of some shards: its label, in (file, record) order.

    ``positions[i]`` is record i's position within its file; ``file_ids[i]`` its file;
    ``skipped`` names the records left out as bad, as "shard:record (why)".
    """
    files: Tuple[str, ...]
    file_ids: np.ndarray
    positions: np.ndarray
    labels: np.ndarray
    skipped: Tuple[str, ...]

    def __len__(self) -> int:
        return len(self.labels)


def _check_record(raw: bytes) -> Tuple[Optional[int], str]:
    """(0-based label, "") for a good record, (None, why) for a bad one."""
    try:
        example = tf.io.parse_single_example(raw, _FEATURES)
    except tf.errors.InvalidArgumentError:
        return None, "not a tf.train.Example with image/encoded and image/class/label"
    label = int(example["image/class/label"])
    if not 1 <= label <= NUM_CLASSES:
        return None, f"label {label} outside 1..{NUM_CLASSES}"
    if not example["image/encoded"].numpy().startswith(_JPEG_MAGIC):
        return None, "image/encoded is not a JPEG"
    return label - 1, ""


def _check_batch(raws: tf.Tensor) -> List[Tuple[Optional[int], str]]:
    """``_check_record`` of every record of a batch, parsed at once where they all parse."""
    try:
        example = tf.io.parse_example(raws, _FEATURES)
    except tf.errors.InvalidArgumentError:
        return [_check_record(raw) for raw in raws.numpy()]
    labels = example["image/class/label"].numpy()
    is_jpeg = (tf.strings.substr(example["image/encoded"], 0, len(_JPEG_MAGIC))
               == _JPEG_MAGIC).numpy()
    return [(None, f"label {label} outside 1..{NUM_CLASSES}") if not 1 <= label <= NUM_CLASSES
            else (None, "image/encoded is not a JPEG") if not jpeg else (int(label) - 1, "")
            for label, jpeg in zip(labels, is_jpeg)]


def _index_file(path: str, skip_bad_records: bool, batch_size: int):
    """(positions, labels, skipped) of one shard's records."""
    positions, labels, skipped = [], [], []
    position = -1
    try:
        for raws in tf.data.TFRecordDataset(path).batch(batch_size):
            for label, why in _check_batch(raws):
                position += 1
                if label is None:
                    if not skip_bad_records:
                        raise DataError(f"record {position} of {path} is bad ({why}); re-create "
                                        "the shard, or pass --skip_bad_records to leave such "
                                        "records out.")
                    skipped.append(f"{os.path.basename(path)}:{position} ({why})")
                    continue
                positions.append(position)
                labels.append(label)
    except tf.errors.DataLossError as error:
        if batch_size > 1:
            # Records of the broken batch before the damage are readable: find them one by one.
            return _index_file(path, skip_bad_records, batch_size=1)
        why = f"the shard is corrupt after record {position} ({error.message.splitlines()[0]})"
        if not skip_bad_records:
            raise DataError(f"{path}: {why}; re-create it, or pass --skip_bad_records to "
                            "use the records before the damage.") from error
        skipped.append(f"{os.path.basename(path)}:{position + 1}.. ({why})")
    return positions, labels, skipped


def _cache_path(files: Sequence[str], skip_bad_records: bool) -> str:
    """Where the index of exactly these shards (paths, sizes, modification times) is kept."""
    key = hashlib.sha256(repr([(os.path.abspath(f), os.path.getsize(f), os.path.getmtime(f))
                               for f in files] + [skip_bad_records]).encode()).hexdigest()[:24]
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "ranet", "imagenet_index", f"{key}.npz")


def index_records(files: Sequence[str], skip_bad_records: bool = False,
                  cache: bool = True) -> RecordIndex:
    """Reads every record of ``files`` once: labels, and a check of each record.

    A bad record (unreadable, no JPEG, a label outside 1..1000) raises ``DataError`` naming
    its shard, or, with ``skip_bad_records``, is left out and listed in ``skipped``. With
    ``cache``, the index is kept under ~/.cache/ranet (``XDG_CACHE_HOME``) and read back while
    the shards keep their paths, sizes and modification times: full ImageNet takes minutes
    to index, and every process of every run needs it.
    """
    cache_path = _cache_path(files, skip_bad_records) if cache else None
    if cache_path and os.path.exists(cache_path):
        try:
            with np.load(cache_path) as cached:
                return RecordIndex(files=tuple(files), file_ids=cached["file_ids"],
                                   positions=cached["positions"], labels=cached["labels"],
                                   skipped=tuple(str(s) for s in cached["skipped"]))
        except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile) as error:
            logging.warning("ignoring the unreadable index cache %s (%s)", cache_path, error)
    logging.info("indexing %d ImageNet shards", len(files))
    file_ids, positions, labels, skipped = [], [], [], []
    for file_id, path in enumerate(files):
        file_positions, file_labels, file_skipped = _index_file(path, skip_bad_records,
                                                                _INDEX_BATCH)
        file_ids += [file_id] * len(file_positions)
        positions += file_positions
        labels += file_labels
        skipped += file_skipped
    if skipped:
        logging.warning("skipped %d bad ImageNet records: %s", len(skipped),
                        "; ".join(skipped[:10]) + (" ..." if len(skipped) > 10 else ""))
    index = RecordIndex(files=tuple(files), file_ids=np.array(file_ids, np.int32),
                        positions=np.array(positions, np.int64),
                        labels=np.array(labels, np.int32), skipped=tuple(skipped))
    if cache_path:
        _write_cache(cache_path, index)
    return index


def _write_cache(path: str, index: RecordIndex) -> None:
    """Best effort and atomic: a cache that cannot be written only costs the next run time."""
    staging = None
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=os.path.dirname(path), suffix=".npz",
                                         delete=False) as staging:
            np.savez(staging, file_ids=index.file_ids, positions=index.positions,
                     labels=index.labels, skipped=np.array(index.skipped, dtype=str))
        os.replace(staging.name, path)
    except OSError as error:
        logging.warning("could not cache the ImageNet index at %s (%s)", path, error)
        if staging is not None:
            with contextlib.suppress(OSError):
                os.remove(staging.name)


def record_keys(index: RecordIndex, keep: np.ndarray) -> tf.Tensor:
    """The kept records as int64 keys ``file_id * 2**32 + position``."""
    return tf.constant(index.file_ids[keep].astype(np.int64) * 2 ** 32 + index.positions[keep])


def _decode_eval(encoded: tf.Tensor) -> tf.Tensor:
    """Shorter side to 256 (bilinear), then the centre 224x224; float32 pixels 0..255."""
    image = tf.io.decode_jpeg(encoded, channels=3)
    shape = tf.cast(tf.shape(image)[:2], tf.float32)
    scale = EVAL_RESIZE / tf.reduce_min(shape)
    size = tf.cast(tf.round(shape * scale), tf.int32)
    image = tf.image.resize(image, size, method="bilinear")
    top = (size[0] - IMAGE_SIZE) // 2
    left = (size[1] - IMAGE_SIZE) // 2
    return tf.slice(image, [top, left, 0], [IMAGE_SIZE, IMAGE_SIZE, 3])


def _decode_train(encoded: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    """The random-resized crop, decoded fused with the crop, resized to 224, maybe flipped."""
    shape = tf.io.extract_jpeg_shape(encoded)
    box_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
        shape, bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]), seed=box_seed,
        min_object_covered=0.0, aspect_ratio_range=CROP_ASPECT, area_range=CROP_AREA,
        max_attempts=10, use_image_if_no_bounding_boxes=True)
    window = tf.stack([begin[0], begin[1], size[0], size[1]])
    image = tf.image.decode_and_crop_jpeg(encoded, window, channels=3)
    image = tf.image.resize(image, [IMAGE_SIZE, IMAGE_SIZE], method="bilinear")
    return tf.image.stateless_random_flip_left_right(image, flip_seed)


def _parse(raw: tf.Tensor):
    example = tf.io.parse_single_example(raw, _FEATURES)
    return example["image/encoded"], tf.cast(example["image/class/label"] - 1, tf.int32)


def _records(index: RecordIndex, keys: tf.Tensor, file_ids: Sequence[int],
             deterministic: bool, cycle_length: int) -> tf.data.Dataset:
    """(key, raw record) of ``file_ids``' kept records, files interleaved."""
    files = tf.constant([index.files[i] for i in file_ids])
    ids = tf.constant(list(file_ids), tf.int64)

    def read(path, file_id):
        return tf.data.TFRecordDataset(path).enumerate().map(
            lambda position, raw: (file_id * 2 ** 32 + position, raw))

    dataset = tf.data.Dataset.from_tensor_slices((files, ids)).interleave(
        read, cycle_length=cycle_length, num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=deterministic)

    table = tf.lookup.StaticHashTable(
        tf.lookup.KeyValueTensorInitializer(keys, tf.ones_like(keys, tf.int32)), default_value=0)

    def kept(key, _raw):
        return table.lookup(key) > 0

    return dataset.filter(kept)


def train_dataset(index: RecordIndex, keep: np.ndarray, *, batch_size: int, seed: int,
                  pipeline_id: int = 0, num_pipelines: int = 1, deterministic: bool = False,
                  rows_per_pipeline: Optional[int] = None, mean=MEAN, std=STD,
                  augment: bool = True, skip_bad_records: bool = False,
                  tf_data_service: Optional[str] = None,
                  cycle_length: int = 16) -> tf.data.Dataset:
    """Endless shuffled training batches (images float32 normalised, labels int32) of one
    input pipeline.

    By default each pipeline reads its own files (``pipeline_id``, ``pipeline_id +
    num_pipelines``, ...) in its own random order. ``deterministic``: every pipeline reads
    one seeded order of all the records and keeps its ``rows_per_pipeline`` rows of each
    global batch (default ``batch_size``), as CIFAR's pipeline does, so a step's images and
    crops do not depend on the number of workers; each pipeline then reads every record but
    decodes only its own.

    With ``tf_data_service`` (grpc://host:port of a dispatcher) every worker of the service
    runs this pipeline (reading, decoding, augmenting, batching: ``ShardingPolicy.OFF``, each
    in its own random order, as the service's documentation advises) and this process only
    receives the batches; with ``deterministic``, the stream is reproducible while the
    service has one worker.
    """
    keys = record_keys(index, keep)
    if deterministic:
        rows = rows_per_pipeline or batch_size
        start = pipeline_id * rows
        # A Python seed (tf.data takes no tensor here); the shuffle buffer spans epoch ends.
        records = _records(index, keys, range(len(index.files)), True, cycle_length).repeat() \
            .shuffle(_SHUFFLE_BUFFER, seed=seed).enumerate() \
            .batch(rows * num_pipelines, drop_remainder=True) \
            .map(lambda count, record: (count[start:start + rows],
                                        (record[0][start:start + rows],
                                         record[1][start:start + rows]))).unbatch()
        crop_stream = 0
    else:
        file_ids = list(range(pipeline_id, len(index.files), num_pipelines))
        if not file_ids:
            raise DataError(f"{len(index.files)} training shards cannot feed {num_pipelines} "
                            "input pipelines (workers): each needs at least one shard.")
        records = _records(index, keys, file_ids, False, cycle_length).repeat() \
            .shuffle(_SHUFFLE_BUFFER).enumerate()
        crop_stream = pipeline_id

    def transform(count, record):
        encoded, label = _parse(record[1])
        if not augment:
            return normalize(_decode_eval(encoded), mean, std), label
        # Drawn per element of the stream: an image seen again gets another crop.
        crop_seed = tf.random.experimental.stateless_fold_in(
            tf.constant([seed, crop_stream], tf.int64), count)
        return normalize(_decode_train(encoded, crop_seed), mean, std), label

    dataset = records.map(transform, num_parallel_calls=tf.data.AUTOTUNE,
                          deterministic=deterministic)
    if skip_bad_records:
        dataset = dataset.ignore_errors(log_warning=True)
    options = tf.data.Options()
    options.deterministic = deterministic
    dataset = dataset.batch(batch_size, drop_remainder=True).with_options(options)
    if tf_data_service:
        if deterministic:
            logging.warning("--deterministic with --tf_data_service: the stream is "
                            "reproducible only while the service has one worker.")
        dataset = dataset.apply(tf.data.experimental.service.distribute(
            processing_mode=tf.data.experimental.service.ShardingPolicy.OFF,
            service=tf_data_service))
    return dataset.prefetch(tf.data.AUTOTUNE)


def _in_order(index: RecordIndex, keep: np.ndarray) -> tf.data.Dataset:
    """(key, raw record) of the kept records, in index order: every evaluation pass reads so."""
    return _records(index, record_keys(index, keep), range(len(index.files)), deterministic=True,
                    cycle_length=1)


def _eval_example(raw: tf.Tensor):
    """(float32 pixels 0..255 of the 256/224 evaluation transform, 0-based label)."""
    encoded, label = _parse(raw)
    return _decode_eval(encoded), label


def eval_dataset(index: RecordIndex, keep: np.ndarray, *, batch_size: int, mean=MEAN,
                 std=STD) -> tf.data.Dataset:
    """One in-order pass over the kept records: (images, labels) batches, the last one short."""

    def transform(_key, raw):
        pixels, label = _eval_example(raw)
        return normalize(pixels, mean, std), label

    return _in_order(index, keep).map(transform, num_parallel_calls=tf.data.AUTOTUNE) \
        .batch(batch_size).prefetch(tf.data.AUTOTUNE)


def read_eval_pixels(index: RecordIndex, keep: np.ndarray, *, batch_size: int = 64) -> Split:
    """The kept records through the evaluation transform, into memory as uint8 pixels.

    What the eval and export binaries work on (they calibrate and time on arrays): 150 KB
    per 224x224 image, so callers read a sample where the split is large.
    """
    count = int(keep.sum())
    logging.info("decoding %d ImageNet images into memory (%.1f GB)", count,
                 count * IMAGE_SIZE * IMAGE_SIZE * 3 / 1e9)

    def transform(_key, raw):
        pixels, label = _eval_example(raw)
        return tf.cast(tf.clip_by_value(tf.round(pixels), 0, 255), tf.uint8), label

    images = np.empty((count, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    labels = np.empty(count, np.int32)
    done = 0
    dataset = _in_order(index, keep).map(transform, num_parallel_calls=tf.data.AUTOTUNE) \
        .batch(batch_size).prefetch(tf.data.AUTOTUNE)
    for batch_images, batch_labels in dataset.as_numpy_iterator():
        images[done:done + len(batch_labels)] = batch_images
        labels[done:done + len(batch_labels)] = batch_labels
        done += len(batch_labels)
        if done % (100 * batch_size) < batch_size:
            logging.info("decoded %d/%d images", done, count)
    if done != count:
        raise DataError(f"{count - done} of the {count} indexed records could not be read back "
                        f"from {os.path.dirname(index.files[0])}: the shards changed after they "
                        "were indexed. Run again.")
    return Split(images, labels)


@dataclasses.dataclass(frozen=True, eq=False)
class RecordSplit:
    """Some records of an index (``keep``): a split that stays on disk."""
    index: RecordIndex
    keep: np.ndarray

    def __len__(self) -> int:
        return int(self.keep.sum())

    @property
    def labels(self) -> np.ndarray:
        return self.index.labels[self.keep]


def load_splits(config) -> DataSplits:
    """ImageNet's splits: train minus the hold-out, the hold-out, and the official validation
    shards as the test split (when present)."""
    train_index = index_records(shard_files(config.data_dir, "train"), config.skip_bad_records)
    held_out = (held_out_mask(train_index.labels, config.validation_size, NUM_CLASSES,
                              config.split_seed) if config.validation_size
                else np.zeros(len(train_index), bool))
    test = None
    if glob.glob(os.path.join(config.data_dir, SHARD_PATTERNS["validation"])):
        test_index = index_records(shard_files(config.data_dir, "validation"),
                                   config.skip_bad_records)
        test = RecordSplit(test_index, np.ones(len(test_index), bool))
    if config.normalization_mean is not None:
        mean, std = config.normalization_mean, config.normalization_std
    else:
        mean, std = MEAN, STD
    return DataSplits(name="imagenet", train=RecordSplit(train_index, ~held_out),
                      validation=RecordSplit(train_index, held_out), test=test,
                      num_classes=NUM_CLASSES, mean=np.array(mean, np.float32),
                      std=np.array(std, np.float32), source=config.data_dir)


def _sample(split: RecordSplit, limit: int, seed: int) -> np.ndarray:
    """The index rows of at most ``limit`` of the split's records (0: all), class-balanced."""
    rows = np.flatnonzero(split.keep)
    keep = np.zeros(len(split.index), bool)
    keep[rows[sample_mask(split.labels, limit, NUM_CLASSES, seed)]] = True
    return keep


def splits_in_memory(splits: DataSplits, *, max_images: int, train_images: int,
                     include_test: bool, seed: int = 0) -> DataSplits:
    """The splits decoded into arrays, for what works on arrays (evaluation, export).

    Validation and test hold at most ``max_images`` images each (0: all), train a sample of
    ``train_images`` (the int8 conversion's representative images; nothing else reads it):
    class-balanced seeded samples by the hold-out rule. Validation and the training sample
    come from the same shards and are decoded in one pass.
    """
    validation = _sample(splits.validation, max_images, seed)
    # Seed 0 whatever ``seed``: the eval and the export convert with the same sample.
    train = _sample(splits.train, train_images, 0)
    decoded = read_eval_pixels(splits.train.index, validation | train)
    is_validation = validation[validation | train]
    test = None
    if include_test and splits.test is not None:
        test = read_eval_pixels(splits.test.index, _sample(splits.test, max_images, seed))
    return dataclasses.replace(splits, train=decoded.subset(~is_validation),
                               validation=decoded.subset(is_validation), test=test)


def train_input_fn(split: RecordSplit, *, global_batch_size: int, mean, std, seed: int,
                   augment: bool = True, start_step: int = 0, deterministic: bool = False,
                   skip_bad_records: bool = False, tf_data_service: Optional[str] = None):
    """Training batches for ``strategy.distribute_datasets_from_function``.

    Each input pipeline reads its own shards. A resumed run (``start_step``) draws a fresh
    order and fresh crops (seeded by the step), not the batches the interrupted run would have
    seen next: the stream is not indexable the way CIFAR's in-memory one is.
    """
    steps_per_epoch(len(split), global_batch_size)

    def input_fn(ctx: tf.distribute.InputContext) -> tf.data.Dataset:
        rows_per_pipeline, per_replica = slice_sizes(ctx, global_batch_size)
        return train_dataset(split.index, split.keep, batch_size=per_replica,
                             seed=seed + start_step, pipeline_id=ctx.input_pipeline_id,
                             num_pipelines=ctx.num_input_pipelines, deterministic=deterministic,
                             rows_per_pipeline=rows_per_pipeline, mean=mean, std=std,
                             augment=augment,
                             skip_bad_records=skip_bad_records, tf_data_service=tf_data_service)

    return input_fn


def eval_input_fn(split: RecordSplit, *, global_batch_size: int, mean, std):
    """One pass, padded to whole global batches: (images, labels, weights), as CIFAR's.

    Every pipeline reads the records and keeps every k-th, so each image is decoded once;
    padding rows repeat the first record with weight 0.
    """
    num_examples = len(split)
    if num_examples == 0:
        raise DataError("The split to evaluate is empty. Evaluate another split, or set "
                        "--validation_size > 0 to evaluate on validation. Received: 0 examples")
    padding = num_eval_steps(num_examples, global_batch_size) * global_batch_size - num_examples

    def input_fn(ctx: tf.distribute.InputContext) -> tf.data.Dataset:
        _, per_replica = slice_sizes(ctx, global_batch_size)
        records = _in_order(split.index, split.keep).map(lambda _key, raw: (raw, tf.constant(1.0)))
        records = records.concatenate(records.take(1).map(
            lambda raw, _weight: (raw, tf.constant(0.0))).repeat(padding))
        records = records.shard(ctx.num_input_pipelines, ctx.input_pipeline_id)

        def transform(raw, weight):
            pixels, label = _eval_example(raw)
            return normalize(pixels, mean, std), label, weight

        return records.map(transform, num_parallel_calls=tf.data.AUTOTUNE) \
            .batch(per_replica).prefetch(tf.data.AUTOTUNE)

    return input_fn

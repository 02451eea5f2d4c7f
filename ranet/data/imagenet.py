"""ImageNet from the standard TFRecord shards: listing, indexing, hold-out, transforms, pipelines.

The shards are those the TensorFlow ImageNet conversion scripts write: ``train-*-of-*`` and
``validation-*-of-*``, each record a ``tf.train.Example`` with ``image/encoded`` (JPEG) and
``image/class/label`` (1..1000). Labels here are 0-based.

The images do not fit in memory, so unlike CIFAR the pipelines stream from the shards:

* ``index_records`` reads every record's label once (and checks the record), giving each
  record a global position in (sorted file, record) order; the validation hold-out is a
  class-balanced seeded pick over those positions, by the same rule as CIFAR's
  (``splits.hold_out``), and the pipelines filter on it.
* Training: files sharded per input pipeline (one per worker under
  MultiWorkerMirroredStrategy), interleaved and read in parallel, shuffled, and cropped by
  a fused ``decode_and_crop_jpeg`` random-resized crop (scale 0.08-1, ratio 3/4-4/3) to 224,
  flipped, normalised. ``deterministic`` fixes the order and the crops from the seed.
* Evaluation: the shorter side resized to 256, the centre 224x224 cropped.
"""

import dataclasses
import glob
import os
from typing import List, Optional, Sequence, Tuple

import numpy as np
import tensorflow as tf
from absl import logging

from ranet.data.pipeline import num_eval_steps, slice_sizes, steps_per_epoch
from ranet.data.splits import DataError, DataSplits, held_out_mask, normalize

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


def index_records(files: Sequence[str], skip_bad_records: bool = False) -> RecordIndex:
    """Reads every record of ``files`` once: labels, and a check of each record.

    A bad record (unreadable, no JPEG, a label outside 1..1000) raises ``DataError`` naming
    its shard, or, with ``skip_bad_records``, is left out and listed in ``skipped``.
    """
    file_ids, positions, labels, skipped = [], [], [], []
    for file_id, path in enumerate(files):
        position = -1
        try:
            for position, raw in enumerate(tf.data.TFRecordDataset(path).as_numpy_iterator()):
                label, why = _check_record(raw)
                if label is None:
                    if not skip_bad_records:
                        raise DataError(f"record {position} of {path} is bad ({why}); re-create "
                                        "the shard, or pass --skip_bad_records to leave such "
                                        "records out.")
                    skipped.append(f"{os.path.basename(path)}:{position} ({why})")
                    continue
                file_ids.append(file_id)
                positions.append(position)
                labels.append(label)
        except tf.errors.DataLossError as error:
            why = f"the shard is corrupt after record {position} ({error.message.splitlines()[0]})"
            if not skip_bad_records:
                raise DataError(f"{path}: {why}; re-create it, or pass --skip_bad_records to "
                                "use the records before the damage.") from error
            skipped.append(f"{os.path.basename(path)}:{position + 1}.. ({why})")
    if skipped:
        logging.warning("skipped %d bad ImageNet records: %s", len(skipped),
                        "; ".join(skipped[:10]) + (" ..." if len(skipped) > 10 else ""))
    return RecordIndex(files=tuple(files), file_ids=np.array(file_ids, np.int32),
                       positions=np.array(positions, np.int64),
                       labels=np.array(labels, np.int32), skipped=tuple(skipped))


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
                  mean=MEAN, std=STD, augment: bool = True, skip_bad_records: bool = False,
                  tf_data_service: Optional[str] = None,
                  cycle_length: int = 16) -> tf.data.Dataset:
    """Endless shuffled training batches (images float32 normalised, labels int32) of one
    input pipeline: the files ``pipeline_id``, ``pipeline_id + num_pipelines``, ...

    With ``tf_data_service`` (grpc://host:port of a dispatcher) every worker of the service
    runs this pipeline (reading, decoding, augmenting, batching: ``ShardingPolicy.OFF``, each
    in its own random order, as the service's documentation advises) and this process only
    receives the batches.
    """
    file_ids = list(range(pipeline_id, len(index.files), num_pipelines))
    if not file_ids:
        raise DataError(f"{len(index.files)} training shards cannot feed {num_pipelines} input "
                        "pipelines (workers): each needs at least one shard.")
    keys = record_keys(index, keep)
    # A Python seed (tf.data takes no tensor here); the shuffle buffer spans epoch ends.
    shuffle_seed = seed * 1_000_003 + pipeline_id if deterministic else None
    records = _records(index, keys, file_ids, deterministic, cycle_length).repeat() \
        .shuffle(_SHUFFLE_BUFFER, seed=shuffle_seed).enumerate()

    def transform(count, record):
        encoded, label = _parse(record[1])
        if not augment:
            return normalize(_decode_eval(encoded), mean, std), label
        # Drawn per element of the stream: an image seen again gets another crop.
        crop_seed = tf.random.experimental.stateless_fold_in(
            tf.constant([seed, pipeline_id], tf.int64), count)
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
            raise DataError("the tf.data service cannot give a deterministic stream: its "
                            "workers each shuffle their own way. Drop --deterministic.")
        dataset = dataset.apply(tf.data.experimental.service.distribute(
            processing_mode=tf.data.experimental.service.ShardingPolicy.OFF,
            service=tf_data_service))
    return dataset.prefetch(tf.data.AUTOTUNE)


def eval_dataset(index: RecordIndex, keep: np.ndarray, *, batch_size: int, mean=MEAN,
                 std=STD) -> tf.data.Dataset:
    """One in-order pass over the kept records: (images, labels) batches, the last one short."""
    keys = record_keys(index, keep)
    records = _records(index, keys, range(len(index.files)), deterministic=True,
                       cycle_length=1)

    def transform(_key, raw):
        encoded, label = _parse(raw)
        return normalize(_decode_eval(encoded), mean, std), label

    return records.map(transform, num_parallel_calls=tf.data.AUTOTUNE) \
        .batch(batch_size).prefetch(tf.data.AUTOTUNE)


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
        _, per_replica = slice_sizes(ctx, global_batch_size)
        return train_dataset(split.index, split.keep, batch_size=per_replica,
                             seed=seed + start_step, pipeline_id=ctx.input_pipeline_id,
                             num_pipelines=ctx.num_input_pipelines, deterministic=deterministic,
                             mean=mean, std=std, augment=augment,
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
        records = _records(split.index, record_keys(split.index, split.keep),
                           range(len(split.index.files)), deterministic=True, cycle_length=1)
        records = records.map(lambda _key, raw: (raw, tf.constant(1.0)))
        records = records.concatenate(records.take(1).map(
            lambda raw, _weight: (raw, tf.constant(0.0))).repeat(padding))
        records = records.shard(ctx.num_input_pipelines, ctx.input_pipeline_id)

        def transform(raw, weight):
            encoded, label = _parse(raw)
            return normalize(_decode_eval(encoded), mean, std), label, weight

        return records.map(transform, num_parallel_calls=tf.data.AUTOTUNE) \
            .batch(per_replica).prefetch(tf.data.AUTOTUNE)

    return input_fn

"""ImageNet TFRecord shards: a tiny generated set (a few dozen JPEGs, a few classes)."""

import glob
import os

import numpy as np
import pytest
import tensorflow as tf

from ranet.data import imagenet
from ranet.data.splits import DataError, held_out_mask

NUM_SHARDS, PER_SHARD = 3, 8


def _example(pixels: np.ndarray, label: int, encoded: bytes = None) -> bytes:
    encoded = encoded if encoded is not None else tf.io.encode_jpeg(pixels, quality=95).numpy()
    feature = {"image/encoded": tf.train.Feature(bytes_list=tf.train.BytesList(value=[encoded])),
               "image/class/label": tf.train.Feature(int64_list=tf.train.Int64List(value=[label]))}
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def write_shards(folder, split="train", num_shards=NUM_SHARDS, per_shard=PER_SHARD, bad=()):
    """Shard s holds class s + 1 only (labels are 1-based on disk); images of varied sizes.

    Each image is one flat colour, brighter for later records, so crops of it are constant.
    ``bad``: (shard, record) pairs whose image is replaced by bytes that are not a JPEG.
    """
    folder.mkdir(exist_ok=True)
    for shard in range(num_shards):
        path = folder / f"{split}-{shard:05d}-of-{num_shards:05d}"
        with tf.io.TFRecordWriter(str(path)) as writer:
            for record in range(per_shard):
                height, width = 40 + 8 * record, 64 + 4 * shard
                pixels = np.full((height, width, 3), 10 * record + 50 * shard, np.uint8)
                encoded = b"not a jpeg" if (shard, record) in bad else None
                writer.write(_example(pixels, shard + 1, encoded))
    return folder


def test_shards_are_listed_sorted_and_missing_ones_explained(tmp_path):
    write_shards(tmp_path / "data")
    files = imagenet.shard_files(str(tmp_path / "data"), "train")
    assert [f.rsplit("/", 1)[1] for f in files] == [
        f"train-{s:05d}-of-{NUM_SHARDS:05d}" for s in range(NUM_SHARDS)]
    with pytest.raises(DataError, match="no validation-\\*-of-\\* TFRecord shards"):
        imagenet.shard_files(str(tmp_path / "data"), "validation")
    with pytest.raises(DataError, match="is not a folder"):
        imagenet.shard_files(str(tmp_path / "absent"), "train")


def test_index_reads_labels_zero_based_in_file_order(tmp_path):
    index = imagenet.index_records(imagenet.shard_files(str(write_shards(tmp_path / "d")), "train"))
    assert len(index) == NUM_SHARDS * PER_SHARD
    np.testing.assert_array_equal(index.labels, np.repeat(np.arange(NUM_SHARDS), PER_SHARD))
    np.testing.assert_array_equal(index.positions, np.tile(np.arange(PER_SHARD), NUM_SHARDS))
    assert index.skipped == ()


def test_a_bad_record_names_its_shard_or_is_skipped_and_counted(tmp_path):
    files = imagenet.shard_files(str(write_shards(tmp_path / "d", bad={(1, 3)})), "train")
    with pytest.raises(DataError, match=r"record 3 of .*train-00001-of-00003 is bad \(image/"
                                        r"encoded is not a JPEG\).*--skip_bad_records"):
        imagenet.index_records(files)
    index = imagenet.index_records(files, skip_bad_records=True)
    assert len(index) == NUM_SHARDS * PER_SHARD - 1
    assert index.skipped == ("train-00001-of-00003:3 (image/encoded is not a JPEG)",)


def test_a_truncated_shard_names_the_shard(tmp_path):
    files = imagenet.shard_files(str(write_shards(tmp_path / "d")), "train")
    with open(files[2], "r+b") as f:
        f.truncate(f.seek(0, 2) - 100)
    with pytest.raises(DataError, match="train-00002-of-00003: the shard is corrupt"):
        imagenet.index_records(files)
    index = imagenet.index_records(files, skip_bad_records=True)
    assert len(index) == NUM_SHARDS * PER_SHARD - 1 and "train-00002" in index.skipped[0]


def test_eval_pass_is_in_order_resized_and_centre_cropped(tmp_path):
    index = imagenet.index_records(
        imagenet.shard_files(str(write_shards(tmp_path / "d", "validation")), "validation"))
    keep = np.ones(len(index), bool)
    keep[5] = False
    batches = list(imagenet.eval_dataset(index, keep, batch_size=10, mean=(0, 0, 0),
                                         std=(1 / 255,) * 3).as_numpy_iterator())
    images = np.concatenate([b[0] for b in batches])
    labels = np.concatenate([b[1] for b in batches])
    assert images.shape == (len(index) - 1, 224, 224, 3)
    np.testing.assert_array_equal(labels, np.delete(index.labels, 5))
    # Flat-colour images stay flat through resize and crop; colour = 10 record + 50 shard.
    expected = np.delete([10 * r + 50 * s for s in range(NUM_SHARDS) for r in range(PER_SHARD)], 5)
    np.testing.assert_allclose(images.mean(axis=(1, 2, 3)), expected, atol=2.0)
    assert images.std(axis=(1, 2, 3)).max() < 2.0


@pytest.mark.slow  # ImageNet-sized images through the training pipeline
def test_training_batches_are_shaped_normalised_and_deterministic(tmp_path):
    index = imagenet.index_records(imagenet.shard_files(str(write_shards(tmp_path / "d")), "train"))
    keep = np.ones(len(index), bool)

    def first_batches(seed):
        dataset = imagenet.train_dataset(index, keep, batch_size=4, seed=seed, deterministic=True)
        return [b for _, b in zip(range(3), dataset.as_numpy_iterator())]

    first, again, other = first_batches(0), first_batches(0), first_batches(1)
    assert first[0][0].shape == (4, 224, 224, 3) and first[0][0].dtype == np.float32
    for (images, labels), (images_again, labels_again) in zip(first, again):
        np.testing.assert_array_equal(images, images_again)
        np.testing.assert_array_equal(labels, labels_again)
    assert any(not np.array_equal(a[1], b[1]) or not np.array_equal(a[0], b[0])
               for a, b in zip(first, other))
    # Normalised with the ImageNet statistics: a flat colour c becomes (c/255 - mean) / std.
    assert np.abs(first[0][0]).max() < 3.0


def test_each_pipeline_reads_its_own_shards_and_the_hold_out_is_filtered(tmp_path):
    index = imagenet.index_records(imagenet.shard_files(str(write_shards(tmp_path / "d")), "train"))
    held_out = held_out_mask(index.labels, 6, NUM_SHARDS, seed=0)
    assert np.bincount(index.labels[held_out]).tolist() == [2, 2, 2]
    seen = {}
    for pipeline in range(2):
        dataset = imagenet.train_dataset(index, ~held_out, batch_size=1, seed=0,
                                         pipeline_id=pipeline, num_pipelines=2)
        labels = [int(b[1][0]) for _, b in zip(range(40), dataset.as_numpy_iterator())]
        seen[pipeline] = set(labels)
        # Shard s holds class s: pipeline 0 reads shards 0 and 2, pipeline 1 shard 1.
        assert seen[pipeline] == ({0, 2} if pipeline == 0 else {1})
    eval_batches = imagenet.eval_dataset(index, held_out, batch_size=100)
    (images, labels), = eval_batches.as_numpy_iterator()
    np.testing.assert_array_equal(labels, index.labels[held_out])


def test_too_few_shards_for_the_pipelines_is_an_error(tmp_path):
    index = imagenet.index_records(imagenet.shard_files(
        str(write_shards(tmp_path / "d", num_shards=1)), "train"))
    with pytest.raises(DataError, match="1 training shards cannot feed 2 input pipelines"):
        imagenet.train_dataset(index, np.ones(len(index), bool), batch_size=1, seed=0,
                               pipeline_id=1, num_pipelines=2)


@pytest.mark.slow  # ImageNet-sized images through the training pipeline
def test_deterministic_pipelines_each_take_their_rows_of_one_global_batch(tmp_path):
    index = imagenet.index_records(imagenet.shard_files(str(write_shards(tmp_path / "d")), "train"))
    keep = np.ones(len(index), bool)
    one = imagenet.train_dataset(index, keep, batch_size=4, seed=3, deterministic=True)
    halves = [imagenet.train_dataset(index, keep, batch_size=2, seed=3, deterministic=True,
                                     pipeline_id=p, num_pipelines=2, rows_per_pipeline=2)
              for p in (0, 1)]
    # 10 steps: past the 24 records, so the second epoch's order and fresh crops too.
    for (images, labels), *parts in zip(one.take(10).as_numpy_iterator(),
                                        *(h.take(10).as_numpy_iterator() for h in halves)):
        np.testing.assert_array_equal(labels, np.concatenate([p[1] for p in parts]))
        np.testing.assert_allclose(images, np.concatenate([p[0] for p in parts]), atol=1e-6)


@pytest.mark.slow  # a tf.data service; tests/end_to_end/test_data_service.py runs one too
def test_training_batches_through_an_in_process_tf_data_service(tmp_path):
    index = imagenet.index_records(imagenet.shard_files(str(write_shards(tmp_path / "d")), "train"))
    service = tf.data.experimental.service
    dispatcher = service.DispatchServer()
    worker = service.WorkerServer(service.WorkerConfig(
        dispatcher_address=dispatcher.target.split("://")[1]))
    dataset = imagenet.train_dataset(index, np.ones(len(index), bool), batch_size=4, seed=0,
                                     tf_data_service=dispatcher.target)
    batches = [b for _, b in zip(range(6), dataset.as_numpy_iterator())]
    assert all(images.shape == (4, 224, 224, 3) for images, _ in batches)
    assert set(np.concatenate([labels for _, labels in batches])) <= {0, 1, 2}
    # One service worker runs the deterministic pipeline as this process would.
    served, local = (imagenet.train_dataset(index, np.ones(len(index), bool), batch_size=4,
                                            seed=0, deterministic=True, tf_data_service=service)
                     for service in (dispatcher.target, None))
    for (images, labels), (local_images, local_labels) in zip(
            served.take(3).as_numpy_iterator(), local.take(3).as_numpy_iterator()):
        np.testing.assert_array_equal(labels, local_labels)
        np.testing.assert_array_equal(images, local_images)
    del worker


def test_tf_data_service_flag_is_checked():
    from ranet.config import DataConfig
    with pytest.raises(ValueError, match="grpc://host:port and serves the streamed ImageNet"):
        DataConfig(dataset="cifar10", tf_data_service="grpc://localhost:5050")
    with pytest.raises(ValueError, match="grpc://host:port"):
        DataConfig(dataset="imagenet", tf_data_service="localhost:5050")
    assert DataConfig(dataset="imagenet", tf_data_service="grpc://h:1").tf_data_service


def test_splits_decode_into_memory_as_class_balanced_samples(tmp_path):
    from ranet import data
    from ranet.config import DataConfig
    data_dir = write_shards(tmp_path / "d")
    write_shards(data_dir, "validation")
    config = DataConfig(dataset="imagenet", data_dir=str(data_dir), validation_size=9)
    splits = data.load_splits_in_memory(config, max_images=6, train_images=4, include_test=True)
    for split, size in ((splits.validation, 6), (splits.test, 6), (splits.train, 4)):
        assert split.images.shape == (size, 224, 224, 3) and split.images.dtype == np.uint8
    assert np.bincount(splits.validation.labels).tolist() == [2, 2, 2]
    assert np.bincount(splits.test.labels).tolist() == [2, 2, 2]
    on_disk = data.load_splits(config)
    # The sampled validation images are held-out ones, decoded as the evaluation pass does.
    (streamed, labels), = imagenet.eval_dataset(
        on_disk.validation.index, on_disk.validation.keep, batch_size=100, mean=(0, 0, 0),
        std=(1 / 255,) * 3).as_numpy_iterator()
    held_out = {(round(float(image.mean())), int(label)) for image, label in zip(streamed, labels)}
    sampled = {(round(float(image.mean())), int(label))
               for image, label in zip(splits.validation.images, splits.validation.labels)}
    assert len(sampled) == 6 and sampled <= held_out
    assert data.load_splits_in_memory(config, include_test=False).test is None


def test_the_index_is_cached_until_a_shard_changes(tmp_path, monkeypatch, caplog):
    files = imagenet.shard_files(str(write_shards(tmp_path / "d")), "train")
    first = imagenet.index_records(files)
    indexed = []
    monkeypatch.setattr(imagenet, "_index_file",
                        lambda *args: indexed.append(args[0]) or ([0], [0], []))
    again = imagenet.index_records(files)
    assert indexed == []  # read back from the cache, not from the shards
    np.testing.assert_array_equal(again.labels, first.labels)
    np.testing.assert_array_equal(again.positions, first.positions)
    assert again.files == first.files
    os.utime(files[1], (1, 1))  # a re-written shard: another modification time
    imagenet.index_records(files)
    assert indexed == files
    imagenet.index_records(files, cache=False)
    assert indexed == files * 2
    # A cache file cut short is read past, and the shards are indexed again.
    for cached in glob.glob(os.path.join(os.environ["XDG_CACHE_HOME"], "ranet", "*", "*.npz")):
        with open(cached, "r+b") as f:
            f.truncate(100)
    monkeypatch.undo()
    np.testing.assert_array_equal(imagenet.index_records(files).labels, first.labels)
    assert "ignoring the unreadable index cache" in caplog.text

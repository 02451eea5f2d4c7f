"""ImageNet TFRecord shards: a tiny generated set (a few dozen JPEGs, a few classes)."""

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
                                         pipeline_id=pipeline, num_pipelines=2,
                                         deterministic=True)
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
    with pytest.raises(DataError, match="cannot give a deterministic stream"):
        imagenet.train_dataset(index, np.ones(len(index), bool), batch_size=4, seed=0,
                               deterministic=True, tf_data_service=dispatcher.target)
    del worker


def test_tf_data_service_flag_is_checked():
    from ranet.config import DataConfig
    with pytest.raises(ValueError, match="grpc://host:port and serves the streamed ImageNet"):
        DataConfig(dataset="cifar10", tf_data_service="grpc://localhost:5050")
    with pytest.raises(ValueError, match="grpc://host:port"):
        DataConfig(dataset="imagenet", tf_data_service="localhost:5050")
    assert DataConfig(dataset="imagenet", tf_data_service="grpc://h:1").tf_data_service

"""Input benchmark: decoded, augmented ImageNet training images per second and per CPU core.

    python -m ranet.bench.input --dataset=imagenet --images=2000 --json=bench_input.json
    python -m ranet.bench.input --dataset=imagenet --data_dir=/data/imagenet   # real shards

Without ``--data_dir`` it writes full-size JPEGs first (ImageNet's typical 500x375, textured
so that they compress like photographs, ~110 kB each) into TFRecord shards in a temporary
folder. It then times the training pipeline (``ranet.data.imagenet.train_dataset``: read,
fused decode-and-crop, resize to 224, flip, normalise, batch) on this process's cores, and
again through a tf.data service whose dispatcher and one worker run in this process: the
same work plus the service's transfer. Benchmarks print numbers; nothing here is a test.
"""

import os
import tempfile
import time

import numpy as np
import tensorflow as tf
from absl import flags, logging

from ranet import cli, jsonio
from ranet.data import imagenet

_SIZE = (375, 500)  # height, width: the most common ImageNet image size


def define_flags(values: flags.FlagValues) -> None:
    define = {"flag_values": values}
    flags.DEFINE_enum("dataset", "imagenet", ["imagenet"], "Dataset whose pipeline to time.",
                      **define)
    flags.DEFINE_string("data_dir", None, "Real TFRecord shards; default: generated ones.",
                        **define)
    flags.DEFINE_integer("images", 2000, "Generated images (without --data_dir).",
                         lower_bound=64, **define)
    flags.DEFINE_integer("shards", 8, "Generated shards.", lower_bound=1, **define)
    flags.DEFINE_integer("batch_size", 64, "Batch size of the pipeline.", lower_bound=1,
                         **define)
    flags.DEFINE_integer("batches", 30, "Timed batches per measurement.", lower_bound=1,
                         **define)
    flags.DEFINE_integer("warmup_batches", 5, "Untimed batches first.", lower_bound=1,
                         **define)
    flags.DEFINE_list("modes", ["local", "service"], "local: this process; service: an "
                      "in-process tf.data service.", **define)
    flags.DEFINE_string("json", None, "Also write the results here.", **define)


def write_jpeg_shards(folder: str, num_images: int, num_shards: int, seed: int = 0) -> None:
    """``num_images`` textured 500x375 JPEGs of 10 classes in ``train-*-of-*`` shards."""
    rng = np.random.default_rng(seed)
    height, width = _SIZE
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    for shard in range(num_shards):
        path = os.path.join(folder, f"train-{shard:05d}-of-{num_shards:05d}")
        with tf.io.TFRecordWriter(path) as writer:
            for _ in range(shard, num_images, num_shards):
                frequency = rng.uniform(0.01, 0.1, 3)
                smooth = 127 + 100 * np.sin(ys[..., None] * frequency + xs[..., None] * frequency[::-1])
                noise = rng.normal(0, 12, (height, width, 3))
                pixels = np.clip(smooth + noise, 0, 255).astype(np.uint8)
                encoded = tf.io.encode_jpeg(pixels, quality=90).numpy()
                label = int(rng.integers(1, 11))
                writer.write(tf.train.Example(features=tf.train.Features(feature={
                    "image/encoded": tf.train.Feature(bytes_list=tf.train.BytesList(
                        value=[encoded])),
                    "image/class/label": tf.train.Feature(int64_list=tf.train.Int64List(
                        value=[label]))})).SerializeToString())


def images_per_second(dataset: tf.data.Dataset, batch_size: int, batches: int,
                      warmup_batches: int) -> float:
    iterator = iter(dataset)
    for _ in range(warmup_batches):
        next(iterator)
    started = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    return batches * batch_size / (time.perf_counter() - started)


def main(values: flags.FlagValues) -> list:
    if set(values.modes) - {"local", "service"}:
        raise ValueError(f"--modes takes local, service or both. Received: "
                         f"--modes={','.join(values.modes)}")
    with tempfile.TemporaryDirectory() as scratch:
        data_dir = values.data_dir
        if data_dir is None:
            logging.info("writing %d JPEGs into %d shards", values.images, values.shards)
            write_jpeg_shards(scratch, values.images, values.shards)
            data_dir = scratch
        index = imagenet.index_records(imagenet.shard_files(data_dir, "train"))
        keep = np.ones(len(index), bool)
        sizes = [os.path.getsize(f) for f in index.files]
        rows, servers = [], []
        for mode in values.modes:
            service = None
            if mode == "service":
                dispatcher = tf.data.experimental.service.DispatchServer()
                servers += [dispatcher, tf.data.experimental.service.WorkerServer(
                    tf.data.experimental.service.WorkerConfig(
                        dispatcher_address=dispatcher.target.split("://")[1]))]
                service = dispatcher.target
            dataset = imagenet.train_dataset(index, keep, batch_size=values.batch_size, seed=0,
                                             tf_data_service=service)
            rate = images_per_second(dataset, values.batch_size, values.batches,
                                     values.warmup_batches)
            rows.append({"mode": mode, "images_per_second": rate,
                         "images_per_second_per_core": rate / os.cpu_count()})
    cores = os.cpu_count()
    print(f"\n{len(index)} images, mean {sum(sizes) / len(index) / 1e3:.0f} kB per record; "
          f"{cores} CPU cores; batch {values.batch_size}")
    print(f"{'mode':<8} {'images/s':>9} {'per core':>9}")
    for row in rows:
        print(f"{row['mode']:<8} {row['images_per_second']:>9.1f} "
              f"{row['images_per_second_per_core']:>9.1f}")
    if values.json:
        jsonio.write(values.json, {"cores": cores, "images": len(index), "results": rows})
    return rows


def run() -> None:
    cli.run(main, define_flags)


if __name__ == "__main__":
    run()

"""Input benchmark: decoded, augmented ImageNet training images per second and per CPU core.

    python -m ranet.bench.input --dataset=imagenet --images=2000 --json=bench_input.json
    python -m ranet.bench.input --dataset=imagenet --data_dir=/data/imagenet   # real shards

Without ``--data_dir`` it writes full-size JPEGs first (ImageNet's typical 500x375, textured
so that they compress like photographs, ~110 kB each) into TFRecord shards in a temporary
folder. It then times the training pipeline (``ranet.data.imagenet.train_dataset``: read,
fused decode-and-crop, resize to 224, flip, normalise, batch) on this process's cores, and
again through a tf.data service whose dispatcher and one worker run in this process: the
same work plus the service's transfer.

Then, for each ImageNet preset of ``--step_presets``, how many such cores one GPU needs. The
GPU's training rate is an estimate until a GPU measures it: the preset's train step
(the trainer's own, on one 224x224 batch) is timed on this CPU, which gives the share of the
CPU's matmul FLOP/s the step achieves (training FLOPs per image: 6 x its multiply-adds); the
same share of ``--gpu_tflops`` gives the GPU's images/s. Benchmarks print numbers; nothing
here is a test.
"""

import dataclasses
import os
import tempfile
import time

import numpy as np
import tensorflow as tf
from absl import flags, logging

from ranet import cli, costs, jsonio, models
from ranet import config as config_lib
from ranet.data import imagenet
from ranet.errors import UsageError
from ranet.training.optimizer import create_optimizer, learning_rate_schedule
from ranet.training.steps import TrainingSteps

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
    flags.DEFINE_list("step_presets", ["ranet_imagenet", "ranet_imagenet_wide",
                                       "resnet50_imagenet"],
                      "ImageNet presets whose GPU input needs to estimate (empty: none).",
                      **define)
    flags.DEFINE_integer("step_batch_size", 8, "Batch of the CPU train step.", lower_bound=1,
                         **define)
    flags.DEFINE_integer("steps", 3, "Timed CPU train steps per preset.", lower_bound=1,
                         **define)
    flags.DEFINE_float("gpu_tflops", 130.0, "Peak TFLOP/s of the trainers' GPU at the "
                       "training precision (default: a Titan RTX's fp16 tensor cores).",
                       lower_bound=0.0, **define)
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


def matmul_flops_per_second(size: int = 2048, repeats: int = 10) -> float:
    """This CPU's float32 FLOP/s on a large matrix product: the rate its arithmetic peaks at."""
    a = tf.random.uniform([size, size])

    @tf.function
    def products(x):
        for _ in range(repeats):
            x = tf.matmul(x, a) * (1.0 / size)
        return x

    products(a).numpy()
    started = time.perf_counter()
    products(a).numpy()
    return repeats * 2 * size ** 3 / (time.perf_counter() - started)


def train_step_images_per_second(preset: str, batch_size: int, steps: int) -> tuple:
    """(images/s of the preset's float32 bare train step on this CPU, multiply-adds per image).

    The trainer's own step (``TrainingSteps.repeat_step``: the preset's loss, weight decay
    and optimizer) on one random batch, as ``ranet.bench.train`` times its bare step.
    """
    config = cli.preset_config(preset)
    optim = dataclasses.replace(config.optim, batch_size=batch_size)
    model = models.get_model(config.model)
    plan = config_lib.plan_steps(optim, config.runtime, steps_per_epoch=1000)
    optimizer = create_optimizer(optim, learning_rate_schedule(optim, plan), "fp32")
    training = TrainingSteps(model, optimizer, tf.distribute.get_strategy(), optim)
    images = tf.random.uniform([batch_size, *model.image_shape], -2.0, 2.0)
    labels = tf.random.uniform([batch_size], 0, model.num_classes, tf.int32)
    training.repeat_step(images, labels, tf.constant(1))
    model.trainable_variables[0].numpy()
    started = time.perf_counter()
    training.repeat_step(images, labels, tf.constant(steps))
    model.trainable_variables[0].numpy()
    return steps * batch_size / (time.perf_counter() - started), costs.count(model).exits[-1].macs


def gpu_input_needs(presets, batch_size: int, steps: int, gpu_tflops: float,
                    images_per_core: float) -> list:
    """Per preset: the CPU step, the estimated GPU rate, and the input cores it needs."""
    cpu_flops = matmul_flops_per_second()
    rows = []
    for preset in presets:
        logging.info("timing %s's train step on this CPU", preset)
        cpu_ips, macs = train_step_images_per_second(preset, batch_size, steps)
        share = cpu_ips * 6 * macs / cpu_flops
        gpu_ips = share * gpu_tflops * 1e12 / (6 * macs)
        rows.append({"preset": preset, "macs": macs, "cpu_step_images_per_second": cpu_ips,
                     "cpu_peak_share": share, "estimated_gpu_images_per_second": gpu_ips,
                     "cores_per_gpu": gpu_ips / images_per_core})
    return rows


def main(values: flags.FlagValues) -> dict:
    if set(values.modes) - {"local", "service"}:
        raise UsageError(f"--modes takes local, service or both. Received: "
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
    local = next((r for r in rows if r["mode"] == "local"), rows[0])
    needs = gpu_input_needs([p for p in values.step_presets if p], values.step_batch_size,
                            values.steps, values.gpu_tflops, local["images_per_second_per_core"])
    print(f"\n{len(index)} images, mean {sum(sizes) / len(index) / 1e3:.0f} kB per record; "
          f"{cores} CPU cores; batch {values.batch_size}")
    print(f"{'mode':<8} {'images/s':>9} {'per core':>9}")
    for row in rows:
        print(f"{row['mode']:<8} {row['images_per_second']:>9.1f} "
              f"{row['images_per_second_per_core']:>9.1f}")
    if needs:
        print(f"\nCores one GPU needs ({values.gpu_tflops:g} TFLOP/s; its rate is an ESTIMATE "
              "until a GPU measures it: the CPU step's share of the CPU's matmul peak, "
              "applied to the GPU's):")
        print(f"{'preset':<22} {'G MACs':>7} {'CPU img/s':>10} {'share':>6} "
              f"{'GPU img/s (est.)':>17} {'cores/GPU':>9}")
        for row in needs:
            print(f"{row['preset']:<22} {row['macs'] / 1e9:>7.2f} "
                  f"{row['cpu_step_images_per_second']:>10.2f} {row['cpu_peak_share']:>6.1%} "
                  f"{row['estimated_gpu_images_per_second']:>17.0f} "
                  f"{row['cores_per_gpu']:>9.1f}")
    result = {"cores": cores, "images": len(index), "results": rows, "gpu_input": needs,
              "gpu_tflops": values.gpu_tflops}
    if values.json:
        jsonio.write(values.json, result)
    return result


def run() -> None:
    cli.run(main, define_flags)


if __name__ == "__main__":
    run()

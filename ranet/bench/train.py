"""Training benchmark: where a training step's time goes.

    python -m ranet.bench.train --presets=ranet_small_cifar10,ranet_cifar10,vgg16_cifar10 \\
        --precisions=fp32,mixed_bfloat16 --json=bench_train.json

For each preset, precision and strategy it measures, at steady state after warm-up:

* ``bare``: the compiled train step repeated on one batch already on the device: the
  ceiling the loop is measured against;
* ``loop``: the real ``train_loop`` pulling batches from the real input pipeline, with
  metrics, the stop/non-finite checks and everything else a training run does per step;
* ``input``: the input pipeline alone (batches per second it can deliver).

``loop overhead`` = 1 - loop/bare: the price of the loop, the metrics and of waiting for
input; ``input bound`` says whether the pipeline alone is slower than the bare step.
Synthetic data by default (same pipeline code as CIFAR: augmentation, normalisation,
per-replica batching); ``--data_dir`` uses real CIFAR-10.
"""

import json
import os
import time

from absl import flags, logging

from ranet import cli
from ranet.bench.common import build_training, preset_model, synthetic_data

FLAGS = flags.FLAGS
flags.DEFINE_list("presets", ["ranet_small_cifar10", "ranet_cifar10", "vgg16_cifar10",
                              "resnet50_cifar10"], "Flagfiles in flags/ (without .cfg).")
flags.DEFINE_list("precisions", ["fp32"], "Precisions to measure.")
flags.DEFINE_list("strategies", ["default"], "Strategies to measure.")
flags.DEFINE_integer("batch_size", 64, "Global batch size.")
flags.DEFINE_integer("steps", 20, "Timed steps per measurement.")
flags.DEFINE_integer("warmup_steps", 5, "Untimed steps first (tracing happens here).")
flags.DEFINE_integer("num_cpu_devices", 0, "Logical CPU devices (for mirrored on a CPU).")
flags.DEFINE_string("data_dir", None, "Real CIFAR-10 instead of synthetic data.")
flags.DEFINE_string("json", None, "Also write the results here.")

def _timed(fn, steps: int) -> float:
    """Seconds per step of ``fn(steps)``, which must block until its work is done."""
    started = time.perf_counter()
    fn(steps)
    return (time.perf_counter() - started) / steps


def measure(model_config, precision: str, strategy_name: str, batch_size: int, steps: int,
            warmup_steps: int, data_config) -> dict:
    import keras
    import tensorflow as tf

    strategy, step_functions, dataset = build_training(model_config, precision, strategy_name,
                                                       batch_size, data_config,
                                                       FLAGS.num_cpu_devices)
    iterator = iter(dataset)
    fixed_batch = next(iterator)

    def bare(n):
        step_functions.repeat_step(*fixed_batch, tf.constant(n))
        step_functions.global_step.numpy()

    def loop(n):
        step_functions.train_loop(iterator, tf.constant(n))
        step_functions.global_step.numpy()

    input_iterator = iter(dataset)

    def pipeline(n):
        for _ in range(n):
            batch = next(input_iterator)
        tf.nest.map_structure(lambda t: t.numpy() if hasattr(t, "numpy") else t,
                              strategy.experimental_local_results(batch[1]))

    results = {}
    for name, fn in (("bare", bare), ("loop", loop), ("input", pipeline)):
        fn(warmup_steps)
        results[name] = batch_size / _timed(fn, steps)
    keras.mixed_precision.set_global_policy("float32")
    return {"model": model_config.name, "precision": precision, "strategy": strategy_name,
            "replicas": strategy.num_replicas_in_sync, "batch_size": batch_size,
            "bare_ips": results["bare"], "loop_ips": results["loop"],
            "input_ips": results["input"],
            "loop_overhead": 1.0 - results["loop"] / results["bare"],
            "input_bound": results["input"] < results["bare"]}


def main(argv):
    if len(argv) > 1:
        raise ValueError(f"unexpected arguments: {' '.join(argv[1:])}")
    from ranet import config as config_lib
    from ranet import latency, runtime
    logging.set_verbosity(logging.INFO)
    runtime.configure_host_devices(FLAGS.num_cpu_devices)
    data_config = (config_lib.DataConfig(dataset="cifar10", data_dir=FLAGS.data_dir)
                   if FLAGS.data_dir else synthetic_data(FLAGS.batch_size))
    rows = []
    for preset in FLAGS.presets:
        model_config = preset_model(preset)
        for precision in FLAGS.precisions:
            for strategy in FLAGS.strategies:
                logging.info("measuring %s, %s, %s", preset, precision, strategy)
                row = measure(model_config, precision, strategy, FLAGS.batch_size, FLAGS.steps,
                              FLAGS.warmup_steps, data_config)
                rows.append({"preset": preset, **row})
    environment = latency.device_info()
    print(f"\n{environment['device']}; TensorFlow {environment['tensorflow']}; "
          f"batch {FLAGS.batch_size}; {'real CIFAR-10' if FLAGS.data_dir else 'synthetic data'}\n")
    print(f"{'preset':<22} {'precision':<15} {'strategy':<10} {'bare img/s':>10} "
          f"{'loop img/s':>10} {'overhead':>9} {'input img/s':>11}")
    for r in rows:
        print(f"{r['preset']:<22} {r['precision']:<15} {r['strategy']:<10} {r['bare_ips']:>10.1f} "
              f"{r['loop_ips']:>10.1f} {100 * r['loop_overhead']:>8.1f}% {r['input_ips']:>11.0f}"
              f"{'  INPUT-BOUND' if r['input_bound'] else ''}")
    if FLAGS.json:
        with open(FLAGS.json, "w") as f:
            json.dump({"environment": environment, "results": rows}, f, indent=2)


def run():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    cli.run(main)


if __name__ == "__main__":
    run()

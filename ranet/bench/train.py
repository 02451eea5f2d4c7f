"""Training benchmark: where a training step's time goes.

    python -m ranet.bench.train --presets=ranet_small_cifar10,ranet_cifar10,vgg16_cifar10 \\
        --precisions=fp32,mixed_bfloat16 --json=bench_train.json

For each preset, precision and strategy it measures, at steady state after warm-up:

* ``bare``: the compiled train step repeated on one batch already on the device: the
  ceiling the loop is measured against;
* ``loop``: the real ``run_steps`` pulling batches from the real input pipeline, with
  metrics, the stop/non-finite checks and everything else a training run does per step;
* ``input``: the input pipeline alone (batches per second it can deliver).

``loop overhead`` = 1 - loop/bare: the price of the loop, the metrics and of waiting for
input; ``input bound`` says whether the pipeline alone is slower than the bare step.
Synthetic data by default (same pipeline code as CIFAR: augmentation, normalisation,
per-replica batching); ``--data_dir`` uses real CIFAR-10.
"""

import itertools
import time

import keras
import tensorflow as tf
from absl import flags, logging

from ranet import cli, devices, jsonio
from ranet.bench.common import preset_experiment
from ranet.errors import UsageError
from ranet.training import setup


def define_flags(values: flags.FlagValues) -> None:
    define = {"flag_values": values}
    flags.DEFINE_list("presets", ["ranet_small_cifar10", "ranet_cifar10", "vgg16_cifar10",
                                  "resnet50_cifar10"], "Presets (flags/*.cfg) by name.", **define)
    flags.DEFINE_list("precisions", ["fp32"], "Precisions to measure.", **define)
    flags.DEFINE_list("strategies", ["default"], "Strategies to measure.", **define)
    flags.DEFINE_integer("batch_size", 64, "Global batch size.", lower_bound=1, **define)
    flags.DEFINE_integer("steps", 20, "Timed steps per measurement.", lower_bound=1, **define)
    flags.DEFINE_integer("warmup_steps", 5, "Untimed steps first (tracing happens here).",
                         lower_bound=1, **define)
    flags.DEFINE_integer("num_cpu_devices", 0, "Logical CPU devices (for mirrored on a CPU).",
                         lower_bound=0, **define)
    flags.DEFINE_list("xla", ["off"], "XLA-compile the per-replica forward and backward: off, "
                      "on, or both (off,on).", **define)
    flags.DEFINE_list("training_layouts", ["sliced"], "RANet layouts to train in: sliced, "
                      "serving, or both (--training_layout).", **define)
    flags.DEFINE_integer("intra_op_threads", 0, "Threads one op may use; 0: every core.",
                         lower_bound=0, **define)
    flags.DEFINE_integer("inter_op_threads", 0, "Ops run at once; 0: every core.",
                         lower_bound=0, **define)
    flags.DEFINE_string("data_dir", None, "Real CIFAR-10 instead of synthetic data.", **define)
    flags.DEFINE_string("json", None, "Also write the results here.", **define)


def _timed(fn, steps: int) -> float:
    """Seconds per step of ``fn(steps)``, which must block until its work is done."""
    started = time.perf_counter()
    fn(steps)
    return (time.perf_counter() - started) / steps


def measure(config, steps: int, warmup_steps: int) -> dict:
    """Images/s of the bare step, the real loop and the input pipeline of ``config``."""
    strategy = setup.create_strategy(config.runtime)
    setup.check(config, strategy)
    training = setup.build(config, strategy)
    step_functions = training.steps
    dataset = training.train_dataset()
    iterator = iter(dataset)
    fixed_batch = next(iterator)

    def bare(n):
        step_functions.repeat_step(*fixed_batch, tf.constant(n))
        step_functions.global_step.numpy()

    def loop(n):
        step_functions.run_steps(iterator, tf.constant(n))
        step_functions.global_step.numpy()

    input_iterator = iter(dataset)

    def pipeline(n):
        for _ in range(n):
            batch = next(input_iterator)
        tf.nest.map_structure(lambda t: t.numpy() if hasattr(t, "numpy") else t,
                              strategy.experimental_local_results(batch[1]))

    batch_size = config.optim.batch_size
    results = {}
    for name, fn in (("bare", bare), ("loop", loop), ("input", pipeline)):
        fn(warmup_steps)
        results[name] = batch_size / _timed(fn, steps)
    keras.mixed_precision.set_global_policy("float32")
    return {"model": config.model.name, "precision": config.runtime.precision,
            "strategy": config.runtime.strategy, "replicas": strategy.num_replicas_in_sync,
            "batch_size": batch_size, "bare_ips": results["bare"], "loop_ips": results["loop"],
            "input_ips": results["input"],
            "loop_overhead": 1.0 - results["loop"] / results["bare"],
            "input_bound": results["input"] < results["bare"]}


def main(values: flags.FlagValues) -> list:
    devices.configure_host_devices(values.num_cpu_devices)
    devices.configure_threads(values.intra_op_threads, values.inter_op_threads)
    if set(values.xla) - {"off", "on"}:
        raise UsageError(f"--xla takes off, on or off,on. Received: --xla={','.join(values.xla)}")
    if set(values.training_layouts) - {"sliced", "serving"}:
        raise UsageError("--training_layouts takes sliced, serving or sliced,serving. "
                         f"Received: --training_layouts={','.join(values.training_layouts)}")
    rows = []
    for preset in values.presets:
        for precision in values.precisions:
            for strategy in values.strategies:
                for xla, layout in itertools.product(values.xla, values.training_layouts):
                    logging.info("measuring %s, %s, %s, XLA %s, %s layout", preset, precision,
                                 strategy, xla, layout)
                    config = preset_experiment(preset, batch_size=values.batch_size,
                                               precision=precision, strategy=strategy,
                                               num_cpu_devices=values.num_cpu_devices,
                                               data_dir=values.data_dir, xla=xla == "on",
                                               training_layout=layout)
                    rows.append({"preset": preset, "xla": xla == "on", "layout": layout,
                                 **measure(config, values.steps, values.warmup_steps)})
    environment = devices.device_info()
    print(f"\n{environment['device']}; TensorFlow {environment['tensorflow']}; "
          f"batch {values.batch_size}; "
          f"{'real CIFAR-10' if values.data_dir else 'synthetic data'}\n")
    print(f"threads: intra {values.intra_op_threads}, inter {values.inter_op_threads} "
          "(0: every core)")
    print(f"{'preset':<22} {'precision':<15} {'strategy':<10} {'XLA':<4} {'layout':<8} "
          f"{'bare img/s':>10} "
          f"{'loop img/s':>10} {'overhead':>9} {'input img/s':>11}")
    for r in rows:
        print(f"{r['preset']:<22} {r['precision']:<15} {r['strategy']:<10} "
              f"{'on' if r['xla'] else 'off':<4} {r['layout']:<8} {r['bare_ips']:>10.1f} "
              f"{r['loop_ips']:>10.1f} {100 * r['loop_overhead']:>8.1f}% {r['input_ips']:>11.0f}"
              f"{'  INPUT-BOUND' if r['input_bound'] else ''}")
    if values.json:
        jsonio.write(values.json, {"environment": environment, "results": rows})
    return rows


def run() -> None:
    cli.run(main, define_flags)


if __name__ == "__main__":
    run()

"""Where a step's time goes, per TensorFlow op type: a tf.profiler trace, summarised.

    python -m ranet.bench.profile --preset=ranet_cifar10 --mode=train --steps=3
    python -m ranet.bench.profile --preset=ranet_small_cifar10 --mode=inference --batch_size=1

``train`` traces the bare compiled train step (as ``ranet.bench.train`` times it);
``inference`` traces the compiled forward pass through every exit. The trace stays in
``--logdir`` for TensorBoard's profile plugin; the table printed is read from that trace
(op time summed over threads, so it can exceed the wall time on several cores).
"""

import collections
import glob
import os
import time

import tensorflow as tf
from absl import flags
from tensorflow.tsl.profiler.protobuf import xplane_pb2

from ranet import cli, devices, jsonio
from ranet.bench.common import preset_experiment
from ranet.config import PRECISIONS
from ranet.training import setup


def define_flags(values: flags.FlagValues) -> None:
    define = {"flag_values": values}
    flags.DEFINE_string("preset", "ranet_cifar10", "Preset (flags/*.cfg) by name.", **define)
    flags.DEFINE_enum("mode", "train", ["train", "inference"], "What to trace.", **define)
    flags.DEFINE_enum("precision", "fp32", list(PRECISIONS), "Precision of the model.", **define)
    flags.DEFINE_integer("batch_size", 64, "Batch size.", lower_bound=1, **define)
    flags.DEFINE_integer("steps", 3, "Traced steps (or forward passes).", lower_bound=1,
                         **define)
    flags.DEFINE_integer("warmup_steps", 3, "Untraced steps first (tracing happens here).",
                         lower_bound=1, **define)
    flags.DEFINE_integer("top", 25, "Op types printed.", lower_bound=1, **define)
    flags.DEFINE_string("logdir", "/tmp/ranet_profile", "Where the trace is written; the "
                        "table reads the newest trace there.", **define)
    flags.DEFINE_string("json", None, "Also write the per-op-type table here.", **define)


def op_type_table(logdir: str) -> dict:
    """{op type: (seconds, calls)} summed over every TF op event of the trace in ``logdir``.

    TensorFlow names a CPU op's event ``<op name>:<op type>``. Events without a type,
    the runtime's own (``ThreadpoolListener::Record``, ``ExecutorState::Process``: C++
    names) and whole-function spans contain or bracket ops, and are skipped.
    """
    paths = glob.glob(os.path.join(logdir, "**", "*.xplane.pb"), recursive=True)
    if not paths:
        raise FileNotFoundError(f"no trace (*.xplane.pb) under {logdir}")
    space = xplane_pb2.XSpace()
    with open(max(paths, key=os.path.getmtime), "rb") as f:
        space.ParseFromString(f.read())
    seconds, calls = collections.Counter(), collections.Counter()
    for plane in space.planes:
        for line in plane.lines:
            for event in line.events:
                name = plane.event_metadata[event.metadata_id].name
                op_type = name.rpartition(":")[2].strip() if ":" in name else ""
                if (not op_type or "::" in name or name.startswith("$")
                        or op_type.startswith("__inference")):
                    continue
                seconds[op_type] += event.duration_ps / 1e12
                calls[op_type] += 1
    return {op: (seconds[op], calls[op]) for op, _ in seconds.most_common()}


def main(values: flags.FlagValues) -> dict:
    config = preset_experiment(values.preset, batch_size=values.batch_size,
                               precision=values.precision)
    strategy = setup.create_strategy(config.runtime)
    setup.check(config, strategy)
    training = setup.build(config, strategy)
    step_functions = training.steps
    images, labels = next(iter(training.train_dataset()))
    if values.mode == "train":
        def run_traced(n):
            step_functions.repeat_step(images, labels, tf.constant(n))
            step_functions.global_step.numpy()
    else:
        forward = tf.function(lambda x: step_functions.model(x, training=False))

        def run_traced(n):
            for _ in range(n):
                [logits.numpy() for logits in forward(images)]

    run_traced(values.warmup_steps)
    tf.profiler.experimental.start(values.logdir)
    started = time.perf_counter()
    run_traced(values.steps)
    wall = (time.perf_counter() - started) / values.steps
    tf.profiler.experimental.stop()

    table = op_type_table(values.logdir)
    total = sum(s for s, _ in table.values())
    ops_per_step = sum(c for _, c in table.values()) / values.steps
    environment = devices.device_info()
    print(f"\n{environment['device']}; TensorFlow {environment['tensorflow']}; {values.preset}, "
          f"{values.mode}, {values.precision}, batch {values.batch_size}\n"
          f"wall {1e3 * wall:.1f} ms per step (traced); {ops_per_step:.0f} ops per step; "
          f"trace in {values.logdir}\n")
    print(f"{'op type':<36} {'share':>6} {'ms/step':>9} {'calls/step':>10} {'us/call':>9}")
    for op, (seconds, calls) in list(table.items())[:values.top]:
        print(f"{op:<36} {100 * seconds / total:>5.1f}% {1e3 * seconds / values.steps:>9.1f} "
              f"{calls / values.steps:>10.0f} {1e6 * seconds / calls:>9.1f}")
    result = {"environment": environment, "preset": values.preset, "mode": values.mode,
              "precision": values.precision, "batch_size": values.batch_size,
              "wall_ms_per_step": 1e3 * wall, "ops_per_step": ops_per_step,
              "op_types": {op: {"ms_per_step": 1e3 * s / values.steps,
                                "calls_per_step": c / values.steps}
                           for op, (s, c) in table.items()}}
    if values.json:
        jsonio.write(values.json, result)
    return result


def run() -> None:
    cli.run(main, define_flags)


if __name__ == "__main__":
    run()

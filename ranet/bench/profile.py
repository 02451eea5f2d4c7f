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
import json
import os
import time

from absl import flags, logging

from ranet import cli
from ranet.bench.common import build_training, preset_model, synthetic_data

FLAGS = flags.FLAGS
flags.DEFINE_string("preset", "ranet_cifar10", "Flagfile in flags/ (without .cfg).")
flags.DEFINE_enum("mode", "train", ["train", "inference"], "What to trace.")
flags.DEFINE_enum("precision", "fp32", ["fp32", "mixed_float16", "mixed_bfloat16"],
                  "Precision of the model.")
flags.DEFINE_integer("batch_size", 64, "Batch size.", lower_bound=1)
flags.DEFINE_integer("steps", 3, "Traced steps (or forward passes).", lower_bound=1)
flags.DEFINE_integer("warmup_steps", 3, "Untraced steps first (tracing happens here).",
                     lower_bound=1)
flags.DEFINE_integer("top", 25, "Op types printed.", lower_bound=1)
flags.DEFINE_string("logdir", "/tmp/ranet_profile", "Where the trace is written; the "
                    "table reads the newest trace there.")
flags.DEFINE_string("json", None, "Also write the per-op-type table here.")


def op_type_table(logdir: str) -> dict:
    """{op type: (seconds, calls)} summed over every TF op event of the trace in ``logdir``.

    TensorFlow names a CPU op's event ``<op name>:<op type>``. Events without a type,
    the runtime's own (``ThreadpoolListener::Record``, ``ExecutorState::Process``: C++
    names) and whole-function spans contain or bracket ops, and are skipped.
    """
    from tensorflow.tsl.profiler.protobuf import xplane_pb2
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


def main(argv):
    if len(argv) > 1:
        raise ValueError(f"unexpected arguments: {' '.join(argv[1:])}")
    import tensorflow as tf

    from ranet import latency
    logging.set_verbosity(logging.INFO)
    model_config = preset_model(FLAGS.preset)
    strategy, step_functions, dataset = build_training(
        model_config, FLAGS.precision, "default", FLAGS.batch_size,
        synthetic_data(FLAGS.batch_size))
    images, labels = next(iter(dataset))
    if FLAGS.mode == "train":
        def run(n):
            step_functions.repeat_step(images, labels, tf.constant(n))
            step_functions.global_step.numpy()
    else:
        forward = tf.function(lambda x: step_functions.model(x, training=False))

        def run(n):
            for _ in range(n):
                [logits.numpy() for logits in forward(images)]

    run(FLAGS.warmup_steps)
    tf.profiler.experimental.start(FLAGS.logdir)
    started = time.perf_counter()
    run(FLAGS.steps)
    wall = (time.perf_counter() - started) / FLAGS.steps
    tf.profiler.experimental.stop()

    table = op_type_table(FLAGS.logdir)
    total = sum(s for s, _ in table.values())
    ops_per_step = sum(c for _, c in table.values()) / FLAGS.steps
    environment = latency.device_info()
    print(f"\n{environment['device']}; TensorFlow {environment['tensorflow']}; {FLAGS.preset}, "
          f"{FLAGS.mode}, {FLAGS.precision}, batch {FLAGS.batch_size}\n"
          f"wall {1e3 * wall:.1f} ms per step (traced); {ops_per_step:.0f} ops per step; "
          f"trace in {FLAGS.logdir}\n")
    print(f"{'op type':<36} {'share':>6} {'ms/step':>9} {'calls/step':>10} {'us/call':>9}")
    for op, (seconds, calls) in list(table.items())[:FLAGS.top]:
        print(f"{op:<36} {100 * seconds / total:>5.1f}% {1e3 * seconds / FLAGS.steps:>9.1f} "
              f"{calls / FLAGS.steps:>10.0f} {1e6 * seconds / calls:>9.1f}")
    if FLAGS.json:
        with open(FLAGS.json, "w") as f:
            json.dump({"environment": environment, "preset": FLAGS.preset, "mode": FLAGS.mode,
                       "precision": FLAGS.precision, "batch_size": FLAGS.batch_size,
                       "wall_ms_per_step": 1e3 * wall, "ops_per_step": ops_per_step,
                       "op_types": {op: {"ms_per_step": 1e3 * s / FLAGS.steps,
                                         "calls_per_step": c / FLAGS.steps}
                                    for op, (s, c) in table.items()}}, f, indent=2)


def run():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    cli.run(main)


if __name__ == "__main__":
    run()

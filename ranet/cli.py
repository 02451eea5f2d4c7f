"""Flags shared by the binaries, and their one-time conversion into config objects.

Every binary defines the same flags so that one flagfile (``flags/*.cfg``)
serves ``ranet.train``, ``ranet.summary`` and ``ranet.eval``. Library modules
never read FLAGS.
"""

import sys
from typing import Optional, Tuple

from absl import app, flags

from ranet import config as config_lib

FLAGS = flags.FLAGS


def _dash_ints(text: str, name: str) -> Tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split("-"))
    except ValueError:
        raise ValueError(f"--{name} takes integers joined by '-', e.g. 4-2-1. "
                         f"Received: --{name}={text}") from None


def define_flags() -> None:
    """Defines every flag once (a second call is a no-op, for tests importing several binaries)."""
    if "model" in FLAGS:
        return
    defaults = (config_lib.DataConfig(), config_lib.ModelConfig(), config_lib.OptimConfig())
    data, model, optim = defaults
    # Data.
    flags.DEFINE_enum("dataset", data.dataset, config_lib.DATASETS, "Which images.")
    flags.DEFINE_string("data_dir", None, "Folder holding cifar-10-batches-py or cifar-100-python "
                        "(or that folder itself). Default: the Keras cache, then a download.")
    flags.DEFINE_integer("validation_size", data.validation_size,
                         "Training images held out (class-balanced, fixed seed) for model "
                         "selection and threshold calibration.")
    flags.DEFINE_integer("split_seed", data.split_seed, "Seed of the validation split.")
    flags.DEFINE_bool("augment", data.augment, "Pad-4 random crop and horizontal flip.")
    flags.DEFINE_integer("synthetic_train_size", data.synthetic_train_size,
                         "Training images of --dataset=synthetic.")
    flags.DEFINE_integer("synthetic_test_size", data.synthetic_test_size,
                         "Test images of --dataset=synthetic.")
    # Model.
    flags.DEFINE_enum("model", model.name, config_lib.MODELS, "Which architecture.")
    flags.DEFINE_string("scale_list", "1-2-3", "RANet: scale of each flow, low to high resolution.")
    flags.DEFINE_integer("growth_rate", model.growth_rate, "RANet: base growth rate.")
    flags.DEFINE_string("growth_factors", "4-2-1", "RANet: growth factor of each flow.")
    flags.DEFINE_string("bottleneck_factors", "4-2-1", "RANet: bottleneck factor of each flow.")
    flags.DEFINE_integer("base_channels", model.base_channels, "RANet: stem channels (x factor).")
    flags.DEFINE_integer("num_blocks", model.num_blocks, "RANet: blocks (and exits) of the first flow.")
    flags.DEFINE_integer("block_step", model.block_step, "RANet: extra blocks (and exits) of each further flow.")
    flags.DEFINE_integer("step", model.step, "RANet: dense layers per block.")
    flags.DEFINE_enum("step_mode", model.step_mode, config_lib.STEP_MODES,
                      "RANet: 'even' (same layers per block) or 'lg' (growing).")
    flags.DEFINE_float("compress_factor", model.compress_factor,
                       "RANet: share of channels from the lower-resolution flow.")
    flags.DEFINE_float("reduction", model.reduction, "RANet: transition compression.")
    flags.DEFINE_enum("pretrained", "none", ["none", "imagenet"],
                      "ResNet50 only: start from Keras' ImageNet weights (needs a network once).")
    flags.DEFINE_bool("sync_batch_norm", model.sync_batch_norm,
                      "Batch norm statistics over the global batch (all-reduced over replicas "
                      "and workers) instead of each replica's share; N replicas then train like "
                      "one. Costs three small all-reduces per batch norm layer and step.")
    # Optimisation.
    flags.DEFINE_integer("batch_size", optim.batch_size, "Global batch size, over all replicas.")
    flags.DEFINE_integer("epochs", optim.epochs, "Training epochs (unless --train_steps).")
    flags.DEFINE_integer("train_steps", 0, "Training steps; overrides --epochs when > 0.")
    flags.DEFINE_float("learning_rate", optim.learning_rate,
                       "Learning rate at --reference_batch_size, scaled linearly with the batch.")
    flags.DEFINE_integer("reference_batch_size", optim.reference_batch_size,
                         "Batch size at which --learning_rate applies.")
    flags.DEFINE_float("momentum", optim.momentum, "SGD momentum.")
    flags.DEFINE_bool("nesterov", optim.nesterov, "Nesterov momentum.")
    flags.DEFINE_float("weight_decay", optim.weight_decay, "Coupled L2, as PyTorch SGD.")
    flags.DEFINE_enum("schedule", optim.schedule, config_lib.SCHEDULES,
                      "multistep: x decay_rate at --decay_fractions; cosine: cosine decay.")
    flags.DEFINE_float("decay_rate", optim.decay_rate, "Multistep decay factor.")
    flags.DEFINE_list("decay_fractions", [str(f) for f in optim.decay_fractions],
                      "Fractions of training at which multistep decays.")
    flags.DEFINE_float("warmup_epochs", optim.warmup_epochs, "Linear warm-up (cosine only).")
    flags.DEFINE_list("exit_weights", None, "Loss weight of each exit (default: all 1).")
    flags.DEFINE_float("label_smoothing", optim.label_smoothing, "Label smoothing.")
    # Runtime.
    flags.DEFINE_string("model_dir", None, "Checkpoints, TensorBoard events and config.json.")
    flags.DEFINE_enum("strategy", "default", config_lib.STRATEGIES, "tf.distribute strategy.")
    flags.DEFINE_integer("num_gpus", 0, "GPUs for mirrored/one_device (0: all).")
    flags.DEFINE_integer("num_cpu_devices", 0,
                         "Split the host CPU into N logical devices (to exercise distribution "
                         "without GPUs); 0 leaves it alone.")
    flags.DEFINE_string("tpu", "", "TPU name or address for --strategy=tpu.")
    flags.DEFINE_enum("all_reduce", "auto", config_lib.ALL_REDUCE,
                      "Collective implementation for multi_worker_mirrored.")
    flags.DEFINE_enum("precision", "fp32", config_lib.PRECISIONS,
                      "fp32, mixed_float16 (NVIDIA GPUs, loss scaling) or mixed_bfloat16.")
    flags.DEFINE_bool("xla", False, "XLA-compile the per-replica forward and backward pass.")
    flags.DEFINE_integer("seed", 0, "Seed of initialisation, data order and augmentation.")
    flags.DEFINE_bool("deterministic", False, "Deterministic ops (slower).")
    flags.DEFINE_integer("checkpoint_every_steps", 1000, "Checkpoint interval.")
    flags.DEFINE_integer("keep_checkpoints", 3, "How many recent checkpoints to keep.")
    flags.DEFINE_integer("eval_every_epochs", 1, "Validation interval in epochs.")
    flags.DEFINE_integer("log_every_steps", 100, "Logging and summary interval.")
    flags.DEFINE_integer("stop_at_step", 0,
                         "End this invocation (with a checkpoint) once the global step reaches N; "
                         "the schedule still spans the whole run, and running again resumes. "
                         "For time-boxed jobs. 0: run to the end.")
    flags.DEFINE_float("collective_timeout_seconds", 300.0,
                       "multi_worker_mirrored: a collective (all-reduce) that waits longer than "
                       "this on a worker that is alive but stuck fails the run, with exit "
                       "status 144; a worker that dies is noticed by heartbeats in ~10 s "
                       "anyway. Longer than the slowest checkpoint save or evaluation skew "
                       "between workers. 0: wait forever.")


def data_config() -> config_lib.DataConfig:
    return config_lib.DataConfig(
        dataset=FLAGS.dataset, data_dir=FLAGS.data_dir, validation_size=FLAGS.validation_size,
        split_seed=FLAGS.split_seed, augment=FLAGS.augment,
        synthetic_train_size=FLAGS.synthetic_train_size,
        synthetic_test_size=FLAGS.synthetic_test_size)


def model_config() -> config_lib.ModelConfig:
    return config_lib.ModelConfig(
        name=FLAGS.model, num_classes=data_config().num_classes,
        scale_list=_dash_ints(FLAGS.scale_list, "scale_list"),
        growth_rate=FLAGS.growth_rate,
        growth_factors=_dash_ints(FLAGS.growth_factors, "growth_factors"),
        bottleneck_factors=_dash_ints(FLAGS.bottleneck_factors, "bottleneck_factors"),
        base_channels=FLAGS.base_channels, num_blocks=FLAGS.num_blocks,
        block_step=FLAGS.block_step, step=FLAGS.step, step_mode=FLAGS.step_mode,
        compress_factor=FLAGS.compress_factor, reduction=FLAGS.reduction,
        pretrained=None if FLAGS.pretrained == "none" else FLAGS.pretrained,
        sync_batch_norm=FLAGS.sync_batch_norm)


def _floats(values, name) -> Optional[tuple]:
    if values is None:
        return None
    try:
        return tuple(float(v) for v in values)
    except ValueError:
        raise ValueError(f"--{name} takes comma-separated numbers. Received: {values}") from None


def optim_config() -> config_lib.OptimConfig:
    if FLAGS.train_steps < 0:
        raise ValueError(f"--train_steps must be >= 0 (0: use --epochs). "
                         f"Received: --train_steps={FLAGS.train_steps}")
    return config_lib.OptimConfig(
        batch_size=FLAGS.batch_size, epochs=FLAGS.epochs, train_steps=FLAGS.train_steps or None,
        learning_rate=FLAGS.learning_rate, reference_batch_size=FLAGS.reference_batch_size,
        momentum=FLAGS.momentum, nesterov=FLAGS.nesterov, weight_decay=FLAGS.weight_decay,
        schedule=FLAGS.schedule, decay_rate=FLAGS.decay_rate,
        decay_fractions=_floats(FLAGS.decay_fractions, "decay_fractions"),
        warmup_epochs=FLAGS.warmup_epochs,
        exit_weights=_floats(FLAGS.exit_weights, "exit_weights"),
        label_smoothing=FLAGS.label_smoothing)


def runtime_config() -> config_lib.RuntimeConfig:
    return config_lib.RuntimeConfig(
        model_dir=FLAGS.model_dir or "", strategy=FLAGS.strategy, num_gpus=FLAGS.num_gpus,
        num_cpu_devices=FLAGS.num_cpu_devices, tpu=FLAGS.tpu, all_reduce=FLAGS.all_reduce,
        precision=FLAGS.precision, xla=FLAGS.xla, seed=FLAGS.seed,
        deterministic=FLAGS.deterministic, checkpoint_every_steps=FLAGS.checkpoint_every_steps,
        keep_checkpoints=FLAGS.keep_checkpoints, eval_every_epochs=FLAGS.eval_every_epochs,
        log_every_steps=FLAGS.log_every_steps, stop_at_step=FLAGS.stop_at_step or None,
        collective_timeout_seconds=FLAGS.collective_timeout_seconds)


def experiment_config() -> config_lib.ExperimentConfig:
    return config_lib.ExperimentConfig(data=data_config(), model=model_config(),
                                       optim=optim_config(), runtime=runtime_config())


def fail(message: str) -> None:
    """Ends the binary with a one-line reason and exit status 2, no traceback."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def run(main) -> None:
    """``app.run`` that turns configuration errors into a clean ``fail``."""
    def guarded(argv):
        try:
            return main(argv)
        except (ValueError, FileNotFoundError, FloatingPointError) as error:
            fail(str(error))
    app.run(guarded)

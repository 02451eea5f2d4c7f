"""Flags shared by the binaries, and their one-time conversion into config objects.

Every binary defines the same flags so that one flagfile (``flags/*.cfg``)
serves ``ranet.train``, ``ranet.summary`` and ``ranet.eval``. Library modules
never read FLAGS.
"""

import functools
import sys
import types
from typing import Optional, Tuple

from absl import app, flags

from ranet import config as config_lib

FLAGS = flags.FLAGS


def _dash_ints(text: str, name: str) -> Tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split("-"))
    except ValueError:
        raise ValueError(
            f"--{name} takes integers joined by '-', e.g. 4-2-1. " f"Received: --{name}={text}"
        ) from None


def define_flags(flag_values: flags.FlagValues = FLAGS) -> None:
    """Defines every flag once (a second call is a no-op, for tests importing several binaries)."""
    if "model" in flag_values:
        return
    define = types.SimpleNamespace(
        **{
            kind: functools.partial(getattr(flags, f"DEFINE_{kind}"), flag_values=flag_values)
            for kind in ("bool", "enum", "float", "integer", "list", "string")
        }
    )
    defaults = (config_lib.DataConfig(), config_lib.ModelConfig(), config_lib.OptimConfig())
    data, model, optim = defaults
    # Data.
    define.enum("dataset", data.dataset, config_lib.DATASETS, "Which images.")
    define.string(
        "data_dir",
        None,
        "Folder holding cifar-10-batches-py or cifar-100-python "
        "(or that folder itself). Default: the Keras cache, then a download.",
    )
    define.integer(
        "validation_size",
        data.validation_size,
        "Training images held out (class-balanced, fixed seed) for model "
        "selection and threshold calibration.",
    )
    define.integer("split_seed", data.split_seed, "Seed of the validation split.")
    define.bool("augment", data.augment, "Pad-4 random crop and horizontal flip.")
    define.integer(
        "synthetic_train_size", data.synthetic_train_size, "Training images of --dataset=synthetic."
    )
    define.integer(
        "synthetic_test_size", data.synthetic_test_size, "Test images of --dataset=synthetic."
    )
    # Model.
    define.enum("model", model.name, config_lib.MODELS, "Which architecture.")
    define.string("scale_list", "1-2-3", "RANet: scale of each flow, low to high resolution.")
    define.integer("growth_rate", model.growth_rate, "RANet: base growth rate.")
    define.string("growth_factors", "4-2-1", "RANet: growth factor of each flow.")
    define.string("bottleneck_factors", "4-2-1", "RANet: bottleneck factor of each flow.")
    define.integer("base_channels", model.base_channels, "RANet: stem channels (x factor).")
    define.integer("num_blocks", model.num_blocks, "RANet: blocks (and exits) of the first flow.")
    define.integer(
        "block_step", model.block_step, "RANet: extra blocks (and exits) of each further flow."
    )
    define.integer("step", model.step, "RANet: dense layers per block.")
    define.enum(
        "step_mode",
        model.step_mode,
        config_lib.STEP_MODES,
        "RANet: 'even' (same layers per block) or 'lg' (growing).",
    )
    define.float(
        "compress_factor",
        model.compress_factor,
        "RANet: share of channels from the lower-resolution flow.",
    )
    define.float("reduction", model.reduction, "RANet: transition compression.")
    define.enum(
        "pretrained",
        "none",
        ["none", "imagenet"],
        "ResNet50 only: start from Keras' ImageNet weights (needs a network once).",
    )
    define.bool(
        "sync_batch_norm",
        model.sync_batch_norm,
        "Batch norm statistics over the global batch (all-reduced over replicas "
        "and workers) instead of each replica's share; N replicas then train like "
        "one. Costs three small all-reduces per batch norm layer and step.",
    )
    # Optimisation.
    define.integer("batch_size", optim.batch_size, "Global batch size, over all replicas.")
    define.integer("epochs", optim.epochs, "Training epochs (unless --train_steps).")
    define.integer("train_steps", 0, "Training steps; overrides --epochs when > 0.")
    define.float(
        "learning_rate",
        optim.learning_rate,
        "Learning rate at --reference_batch_size, scaled linearly with the batch.",
    )
    define.integer(
        "reference_batch_size",
        optim.reference_batch_size,
        "Batch size at which --learning_rate applies.",
    )
    define.float("momentum", optim.momentum, "SGD momentum.")
    define.bool("nesterov", optim.nesterov, "Nesterov momentum.")
    define.float("weight_decay", optim.weight_decay, "Coupled L2, as PyTorch SGD.")
    define.enum(
        "schedule",
        optim.schedule,
        config_lib.SCHEDULES,
        "multistep: x decay_rate at --decay_fractions; cosine: cosine decay.",
    )
    define.float("decay_rate", optim.decay_rate, "Multistep decay factor.")
    define.list(
        "decay_fractions",
        [str(f) for f in optim.decay_fractions],
        "Fractions of training at which multistep decays.",
    )
    define.float("warmup_epochs", optim.warmup_epochs, "Linear warm-up (cosine only).")
    define.list("exit_weights", None, "Loss weight of each exit (default: all 1).")
    define.float("label_smoothing", optim.label_smoothing, "Label smoothing.")
    # Runtime.
    define.string("model_dir", None, "Checkpoints, TensorBoard events and config.json.")
    define.enum("strategy", "default", config_lib.STRATEGIES, "tf.distribute strategy.")
    define.integer("num_gpus", 0, "GPUs for mirrored/one_device (0: all).")
    define.integer(
        "num_cpu_devices",
        0,
        "Split the host CPU into N logical devices (to exercise distribution "
        "without GPUs); 0 leaves it alone.",
    )
    define.string("tpu", "", "TPU name or address for --strategy=tpu.")
    define.enum(
        "all_reduce",
        "auto",
        config_lib.ALL_REDUCE,
        "Collective implementation for multi_worker_mirrored.",
    )
    define.enum(
        "precision",
        "fp32",
        config_lib.PRECISIONS,
        "fp32, mixed_float16 (NVIDIA GPUs, loss scaling) or mixed_bfloat16.",
    )
    define.bool("xla", False, "XLA-compile the per-replica forward and backward pass.")
    define.integer("seed", 0, "Seed of initialisation, data order and augmentation.")
    define.bool("deterministic", False, "Deterministic ops (slower).")
    define.integer("checkpoint_every_steps", 1000, "Checkpoint interval.")
    define.integer("keep_checkpoints", 3, "How many recent checkpoints to keep.")
    define.integer("eval_every_epochs", 1, "Validation interval in epochs.")
    define.integer("log_every_steps", 100, "Logging and summary interval.")
    define.integer(
        "stop_at_step",
        0,
        "End this invocation (with a checkpoint) once the global step reaches N; "
        "the schedule still spans the whole run, and running again resumes. "
        "For time-boxed jobs. 0: run to the end.",
    )
    define.float(
        "collective_timeout_seconds",
        300.0,
        "multi_worker_mirrored: a collective (all-reduce) that waits longer than "
        "this on a worker that is alive but stuck fails the run, with exit "
        "status 144; a worker that dies is noticed by heartbeats in ~10 s "
        "anyway. Longer than the slowest checkpoint save or evaluation skew "
        "between workers. 0: wait forever.",
    )


def data_config(values: flags.FlagValues = FLAGS) -> config_lib.DataConfig:
    return config_lib.DataConfig(
        dataset=values.dataset,
        data_dir=values.data_dir,
        validation_size=values.validation_size,
        split_seed=values.split_seed,
        augment=values.augment,
        synthetic_train_size=values.synthetic_train_size,
        synthetic_test_size=values.synthetic_test_size,
    )


def model_config(values: flags.FlagValues = FLAGS) -> config_lib.ModelConfig:
    return config_lib.ModelConfig(
        name=values.model,
        num_classes=data_config(values).num_classes,
        scale_list=_dash_ints(values.scale_list, "scale_list"),
        growth_rate=values.growth_rate,
        growth_factors=_dash_ints(values.growth_factors, "growth_factors"),
        bottleneck_factors=_dash_ints(values.bottleneck_factors, "bottleneck_factors"),
        base_channels=values.base_channels,
        num_blocks=values.num_blocks,
        block_step=values.block_step,
        step=values.step,
        step_mode=values.step_mode,
        compress_factor=values.compress_factor,
        reduction=values.reduction,
        pretrained=None if values.pretrained == "none" else values.pretrained,
        sync_batch_norm=values.sync_batch_norm,
    )


def _floats(values, name) -> Optional[tuple]:
    if values is None:
        return None
    try:
        return tuple(float(v) for v in values)
    except ValueError:
        raise ValueError(f"--{name} takes comma-separated numbers. Received: {values}") from None


def optim_config(values: flags.FlagValues = FLAGS) -> config_lib.OptimConfig:
    if values.train_steps < 0:
        raise ValueError(
            f"--train_steps must be >= 0 (0: use --epochs). "
            f"Received: --train_steps={values.train_steps}"
        )
    return config_lib.OptimConfig(
        batch_size=values.batch_size,
        epochs=values.epochs,
        train_steps=values.train_steps or None,
        learning_rate=values.learning_rate,
        reference_batch_size=values.reference_batch_size,
        momentum=values.momentum,
        nesterov=values.nesterov,
        weight_decay=values.weight_decay,
        schedule=values.schedule,
        decay_rate=values.decay_rate,
        decay_fractions=_floats(values.decay_fractions, "decay_fractions"),
        warmup_epochs=values.warmup_epochs,
        exit_weights=_floats(values.exit_weights, "exit_weights"),
        label_smoothing=values.label_smoothing,
    )


def runtime_config(values: flags.FlagValues = FLAGS) -> config_lib.RuntimeConfig:
    return config_lib.RuntimeConfig(
        model_dir=values.model_dir or "",
        strategy=values.strategy,
        num_gpus=values.num_gpus,
        num_cpu_devices=values.num_cpu_devices,
        tpu=values.tpu,
        all_reduce=values.all_reduce,
        precision=values.precision,
        xla=values.xla,
        seed=values.seed,
        deterministic=values.deterministic,
        checkpoint_every_steps=values.checkpoint_every_steps,
        keep_checkpoints=values.keep_checkpoints,
        eval_every_epochs=values.eval_every_epochs,
        log_every_steps=values.log_every_steps,
        stop_at_step=values.stop_at_step or None,
        collective_timeout_seconds=values.collective_timeout_seconds,
    )


def experiment_config(values: flags.FlagValues = FLAGS) -> config_lib.ExperimentConfig:
    return config_lib.ExperimentConfig(
        data=data_config(values),
        model=model_config(values),
        optim=optim_config(values),
        runtime=runtime_config(values),
    )


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

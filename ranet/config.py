"""Frozen, validated configuration objects, one per concern, and the plan of a run in steps.

The binaries turn flags into these once (``ranet.cli`` generates the flags from the fields
below: each field that is a flag carries its help text); library modules never read flags.
Every object round-trips through JSON, so that a model directory records the exact
configuration it was trained with (``<model_dir>/config.json``). Durations (epochs, warm-up,
evaluation intervals, decay points) become steps in one place: ``plan_steps``.

Model-specific rules (RANet's and MSDNet's architecture arguments) are checked by the model's
own module, through ``ranet.models.validate``.
"""

import dataclasses
import os
import re
from typing import Any, Optional, Sequence

from ranet import jsonio
from ranet.errors import MissingPathError, UsageError

DATASETS = ("cifar10", "cifar100", "imagenet", "synthetic")
MODELS = ("ranet", "msdnet", "vgg16", "resnet50", "mobilenet_v2")
STRATEGIES = ("default", "one_device", "mirrored", "multi_worker_mirrored", "tpu")
PRECISIONS = ("fp32", "mixed_float16", "mixed_bfloat16")
ALL_REDUCE = ("auto", "ring", "nccl")
SCHEDULES = ("multistep", "cosine", "linear")
STEP_MODES = ("even", "lg", "lin_grow")
PRUNE_RULES = ("max", "min")
CONV_PADDINGS = ("pytorch", "same")
TRAINABLE = ("all", "classifiers")
CONFIG_FILENAME = "config.json"

_NUM_CLASSES = {"cifar10": 10, "cifar100": 100, "imagenet": 1000, "synthetic": 10}
_IMAGE_SIZES = {"cifar10": 32, "cifar100": 32, "imagenet": 224, "synthetic": 32}
# The reference's CIFAR crop: zero-pad by 4, crop back at random.
_REFERENCE_CROP_PADDING = 4
# The Keras dtype policy of each --precision.
_POLICIES = {"fp32": "float32", "mixed_float16": "mixed_float16",
             "mixed_bfloat16": "mixed_bfloat16"}


def require(condition: bool, message: str) -> None:
    """Raises ``UsageError(message)`` unless ``condition``: the form of every config check."""
    if not condition:
        raise UsageError(message)


def check_choice(name: str, value: Any, choices: Sequence) -> None:
    """The one phrasing of an unknown choice: what is allowed, then what was received."""
    require(value in choices, f"{name} must be one of {', '.join(map(str, choices))}. "
                              f"Received: {name}={value!r}")


_DURATION_UNITS = {"d": 86400, "h": 3600, "m": 60, "s": 1}


def parse_duration(text: str, name: str) -> float:
    """Seconds of a duration such as 90s, 12m, 8h or 1h30m."""
    match = re.fullmatch(r"(?:(\d+(?:\.\d+)?)([dhms]))+", text.strip())
    parts = re.findall(r"(\d+(?:\.\d+)?)([dhms])", text.strip()) if match else []
    seconds = sum(float(number) * _DURATION_UNITS[unit] for number, unit in parts)
    require(bool(parts) and seconds > 0,
            f"{name} takes a duration such as 90s, 12m, 8h or 1h30m. Received: {name}={text!r}")
    return seconds


def dtype_policy(precision: str) -> str:
    """The Keras dtype policy name of a ``--precision`` value."""
    check_choice("precision", precision, PRECISIONS)
    return _POLICIES[precision]


def flag(default, help: str, *, name: Optional[str] = None, kind: Optional[str] = None,
         choices: Optional[Sequence] = None, unset=None, lower_bound=None):
    """A config field that is also a command-line flag (``ranet.cli`` defines it).

    Args:
        default: the field's default, also the flag's.
        help: the flag's help text.
        name: the flag's name, when it is not the field's.
        kind: how the flag is typed, when the default does not tell: "int", "float", "str",
            "ints" (integers joined by '-', e.g. 4-2-1), "floats" or "list" (comma-separated
            numbers or words) or "strings" (the flag repeated).
        choices: an enum flag's allowed values.
        unset: the flag value that stands for ``None`` in the config (e.g. 0 or "none").
        lower_bound: the smallest value an integer or float flag takes.
    """
    return dataclasses.field(default=default, metadata={
        "help": help, "name": name, "kind": kind, "choices": choices, "unset": unset,
        "lower_bound": lower_bound})


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Which images, how many are held out for validation, how they are augmented."""
    dataset: str = flag("cifar10", "Which images.", choices=DATASETS)
    data_dir: Optional[str] = flag(
        None, "Folder holding cifar-10-batches-py or cifar-100-python (or that folder "
        "itself; default: the Keras cache, then a download), or ImageNet's TFRecord shards "
        "(train-*-of-*, validation-*-of-*).", kind="str")
    validation_size: int = flag(
        5000, "Training images held out (class-balanced, fixed seed) for model selection "
        "and threshold calibration.")
    test_size: int = flag(
        0, "CIFAR: training images held out as the test split (class-balanced, seeded, "
        "disjoint from validation), for a data folder without the test file, like the "
        "shared CIFAR-10 copy. 0: the folder's own test file, if any.", lower_bound=0)
    split_seed: int = flag(0, "Seed of the validation (and --test_size) split.")
    augment: bool = flag(True, "CIFAR: random crop (--crop_padding) and horizontal flip; "
                         "ImageNet: random-resized crop and flip.")
    crop_padding: int = flag(
        _REFERENCE_CROP_PADDING, "CIFAR: zero pixels padded around each training image "
        "before the random crop of its original size (the reference's 4); 0: flips only.",
        lower_bound=0)
    tf_data_service: Optional[str] = flag(
        None, "ImageNet: grpc://host:port of a tf.data service dispatcher; the training "
        "images are then decoded and augmented on its workers, not on the training hosts "
        "(launch/README.md starts them). Not with --deterministic.", kind="str")
    skip_bad_records: bool = flag(
        False, "ImageNet: leave out records that cannot be read (counted and reported) "
        "instead of stopping at the first, which names its shard.")
    normalization_mean: Optional[tuple] = flag(
        None, "Per-channel mean (R,G,B, pixel/255 units) the inputs are normalised with. "
        "Default: computed over the train split. Models imported from the reference use "
        "its constants (python -m ranet.import_reference sets them).", kind="floats")
    normalization_std: Optional[tuple] = flag(
        None, "Per-channel standard deviation to go with --normalization_mean.", kind="floats")
    synthetic_train_size: int = flag(2048, "Training images of --dataset=synthetic.")
    synthetic_test_size: int = flag(512, "Test images of --dataset=synthetic.")

    def __post_init__(self):
        check_choice("dataset", self.dataset, DATASETS)
        require(self.crop_padding >= 0, f"crop_padding must be >= 0 (0: flips only). "
                                        f"Received: crop_padding={self.crop_padding}")
        require(self.dataset != "imagenet" or self.crop_padding == _REFERENCE_CROP_PADDING,
                "crop_padding applies to the images held in memory (CIFAR, synthetic); "
                "ImageNet's training crop is the random-resized crop. Leave --crop_padding "
                f"at {_REFERENCE_CROP_PADDING} for --dataset=imagenet. "
                f"Received: crop_padding={self.crop_padding}")
        require(self.test_size == 0 or self.dataset in ("cifar10", "cifar100"),
                "--test_size holds a test split out of CIFAR's training images; "
                f"{self.dataset} has its own. Received: test_size={self.test_size}")
        require(self.validation_size >= 0,
                f"validation_size must be >= 0. Received: validation_size={self.validation_size}")
        for field in ("normalization_mean", "normalization_std"):
            if getattr(self, field) is not None:
                object.__setattr__(self, field, tuple(float(v) for v in getattr(self, field)))
        require((self.normalization_mean is None) == (self.normalization_std is None),
                "--normalization_mean and --normalization_std go together: pass both or "
                f"neither. Received: normalization_mean={self.normalization_mean}, "
                f"normalization_std={self.normalization_std}")
        if self.normalization_mean is not None:
            require(len(self.normalization_mean) == 3 == len(self.normalization_std)
                    and min(self.normalization_std) > 0,
                    "--normalization_mean and --normalization_std need 3 values each (R,G,B), "
                    f"the std positive. Received: normalization_mean={self.normalization_mean}, "
                    f"normalization_std={self.normalization_std}")
        require(self.tf_data_service is None or (
                    self.dataset == "imagenet" and self.tf_data_service.startswith("grpc://")),
                "--tf_data_service takes grpc://host:port and serves the streamed ImageNet "
                "pipeline (CIFAR is decoded in memory already). Received: "
                f"dataset={self.dataset}, tf_data_service={self.tf_data_service}")
        require(self.synthetic_train_size > 0 and self.synthetic_test_size > 0,
                "synthetic_train_size and synthetic_test_size must be positive. Received: "
                f"{self.synthetic_train_size}, {self.synthetic_test_size}")

    @property
    def num_classes(self) -> int:
        return _NUM_CLASSES[self.dataset]

    @property
    def image_size(self) -> int:
        return _IMAGE_SIZES[self.dataset]

    def with_data_dir(self, data_dir: Optional[str]) -> "DataConfig":
        """The same data read from ``data_dir`` (unchanged when it is None)."""
        return self if data_dir is None else dataclasses.replace(self, data_dir=data_dir)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture. The RANet and MSDNet fields mirror their references' arguments (names
    spelled out, reference argument in brackets); the two share the fields they share there.
    The defaults are RANet's CIFAR ones: an MSDNet takes its preset (flags/msdnet_*.cfg)."""
    name: str = flag("ranet", "Which architecture.", name="model", choices=MODELS)
    num_classes: int = 10                    # from the dataset
    image_size: int = 32                     # from the dataset
    # From the dataset: the reference's ImageNet stem (7x7/2 conv, max-pool) and exit heads.
    imagenet: bool = False
    # Checked by ranet.models.ranet.validate and ranet.models.msdnet.validate.
    scale_list: tuple = flag(                                         # --scale-list
        (1, 2, 3), "RANet: scale of each flow, low to high resolution.", kind="ints")
    growth_rate: int = flag(6, "RANet, MSDNet: base growth rate.")    # --growthRate
    growth_factors: tuple = flag(                                     # --grFactor
        (4, 2, 1), "RANet: growth factor of each flow, low to high resolution. MSDNet: of "
        "each scale, fine to coarse (e.g. 1-2-4; one scale per entry).", kind="ints")
    bottleneck_factors: tuple = flag(                                 # --bnFactor
        (4, 2, 1), "RANet, MSDNet: bottleneck factor of each flow or scale, in "
        "--growth_factors' order.", kind="ints")
    base_channels: int = flag(                                        # --nChannels
        16, "RANet, MSDNet: stem channels (x growth factor).")
    num_blocks: int = flag(                                           # --nBlocks
        2, "RANet: blocks (and exits) of the first flow. MSDNet: blocks, one exit each.")
    block_step: int = flag(                                           # --block-step
        2, "RANet: extra blocks (and exits) of each further flow.")
    step: int = flag(                                                 # --step
        4, "RANet: dense layers per block. MSDNet: layers of each block after the first "
        "(even), or the slope of their growth (lin_grow: step x i + 1 in block i + 1).")
    step_mode: str = flag(                                            # --stepmode
        "even", "RANet: 'even' (same layers per block) or 'lg' (growing). MSDNet: 'even' or "
        "'lin_grow'.", choices=STEP_MODES)
    base_layers: int = flag(4, "MSDNet: layers of the first block.")  # --base
    prune: str = flag(                                                # --prune
        "max", "MSDNet: where the finest scales are dropped: max (evenly through the "
        "network, a transition after each drop) or min (at its end).", choices=PRUNE_RULES)
    bottleneck: bool = flag(                                          # --bottleneck
        True, "MSDNet: a 1x1 bottleneck convolution before each 3x3.")
    compress_factor: float = flag(                                    # --compress-factor
        0.25, "RANet: share of channels from the lower-resolution flow.")
    reduction: float = flag(                                          # --reduction
        0.5, "RANet, MSDNet: transition compression (MSDNet: 0 leaves the transitions out).")
    pretrained: Optional[str] = flag(
        None, "ResNet50 only: start from Keras' ImageNet weights (needs a network once).",
        choices=("none", "imagenet"), unset="none")
    sync_batch_norm: bool = flag(
        False, "Batch norm statistics over the global batch (all-reduced over replicas and "
        "workers) instead of each replica's share; N replicas then train like one. Costs "
        "three small all-reduces per batch norm layer and step.")
    conv_padding: str = flag(
        "pytorch", "How strided convolutions pad: pytorch ((k-1)/2 on every side, as the "
        "reference, so its weights import exactly) or same (Keras' 'same': (0, 1) at stride "
        "2; what models trained before ranet 0.2 used, and what their config.json implies).",
        choices=CONV_PADDINGS)

    def __post_init__(self):
        check_choice("model", self.name, MODELS)
        for field in ("scale_list", "growth_factors", "bottleneck_factors"):
            object.__setattr__(self, field, tuple(int(v) for v in getattr(self, field)))
        require(self.num_classes > 1, f"num_classes must be > 1. Received: {self.num_classes}")
        require(self.image_size >= 32 and self.image_size % 8 == 0,
                f"image_size must be a multiple of 8, at least 32. Received: {self.image_size}")
        check_choice("pretrained", self.pretrained, (None, "imagenet"))
        check_choice("conv_padding", self.conv_padding, CONV_PADDINGS)
        require(self.pretrained is None or self.name == "resnet50",
                f"--pretrained=imagenet exists only for resnet50. Received: model={self.name}")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """Optimizer, schedule and duration. Defaults are the reference CIFAR recipe."""
    batch_size: int = flag(64, "Global batch size, over all replicas.")
    epochs: int = flag(300, "Training epochs (unless --train_steps).")
    train_steps: Optional[int] = flag(
        None, "Training steps; overrides --epochs when > 0.", kind="int", unset=0)
    learning_rate: float = flag(
        0.1, "Learning rate at --reference_batch_size, scaled linearly with the batch.")
    reference_batch_size: int = flag(64, "Batch size at which --learning_rate applies.")
    momentum: float = flag(0.9, "SGD momentum.")
    nesterov: bool = flag(False, "Nesterov momentum.")
    weight_decay: float = flag(1e-4, "Coupled L2, as PyTorch SGD.")
    schedule: str = flag("multistep", "multistep: x decay_rate at --decay_fractions; cosine: "
                         "cosine decay to zero; linear: linear decay to zero.", choices=SCHEDULES)
    decay_rate: float = flag(0.1, "Multistep decay factor.")
    decay_fractions: tuple = flag(
        (0.5, 0.75), "Fractions of training at which multistep decays.", kind="floats")
    warmup_epochs: float = flag(0.0, "Linear warm-up from zero, in epochs.")
    exit_weights: Optional[tuple] = flag(
        None, "Loss weight of each exit (default: all 1).", kind="floats")
    label_smoothing: float = flag(0.0, "Label smoothing.")
    time_budget: Optional[str] = flag(
        None, "Train for this long (90s, 12m, 8h, 1h30m), final evaluation and checkpoint "
        "included, instead of --epochs: after a few steps the trainer measures its speed, "
        "plans the number of steps that fits, and fits the schedule to them. The plan is "
        "kept in --model_dir: a resumed run follows it.", kind="str")
    exit_distillation: bool = flag(
        False, "Every exit but the last also learns the last exit's softened softmax (KL "
        "divergence at --distillation_temperature, weight --distillation_weight; Li et al., "
        "ICCV 2019, one-for-all knowledge distillation).")
    distillation_temperature: float = flag(3.0, "Softmax temperature of exit distillation.")
    distillation_weight: float = flag(
        0.9, "Exit distillation: each early exit's loss is (1 - w) cross-entropy + w T^2 KL.")
    gradient_equilibrium: bool = flag(
        False, "Rescale the gradients reaching the shared trunk at each exit (Li et al., ICCV "
        "2019): 1/(K-k+1) from exit k's classifier, (K-k)/(K-k+1) from what follows it.")
    trainable: str = flag(
        "all", "all: every layer trains. classifiers: only the exits' classifiers train; the "
        "shared trunk is frozen, its batch norm on its moving statistics (RANet only). For a "
        "second phase after --init_from, e.g. distillation as the ICCV 2019 code runs it.",
        choices=TRAINABLE)

    def __post_init__(self):
        object.__setattr__(self, "decay_fractions", tuple(float(v) for v in self.decay_fractions))
        if self.exit_weights is not None:
            object.__setattr__(self, "exit_weights", tuple(float(v) for v in self.exit_weights))
        require(self.batch_size > 0, f"batch_size must be positive. Received: {self.batch_size}")
        require(self.epochs > 0, f"epochs must be positive. Received: epochs={self.epochs}")
        require(self.train_steps is None or self.train_steps > 0,
                f"train_steps must be positive. Received: train_steps={self.train_steps}")
        require(self.learning_rate > 0,
                f"learning_rate must be positive. Received: {self.learning_rate}")
        require(self.weight_decay >= 0,
                f"weight_decay must be >= 0. Received: {self.weight_decay}")
        check_choice("schedule", self.schedule, SCHEDULES)
        require(all(0 < f < 1 for f in self.decay_fractions),
                f"decay_fractions must lie in (0, 1). Received: {self.decay_fractions}")
        require(self.warmup_epochs >= 0,
                f"warmup_epochs must be >= 0. Received: {self.warmup_epochs}")
        require(0 <= self.label_smoothing < 1,
                f"label_smoothing must be in [0, 1). Received: {self.label_smoothing}")
        if self.time_budget is not None:
            parse_duration(self.time_budget, "time_budget")
        require(self.time_budget is None or self.train_steps is None,
                "--time_budget and --train_steps both set the length of the run; pass one. "
                f"Received: time_budget={self.time_budget}, train_steps={self.train_steps}")
        require(self.distillation_temperature > 0,
                "distillation_temperature must be positive. Received: "
                f"{self.distillation_temperature}")
        check_choice("trainable", self.trainable, TRAINABLE)
        require(0 <= self.distillation_weight <= 1,
                f"distillation_weight must be in [0, 1]. Received: {self.distillation_weight}")

    @property
    def time_budget_seconds(self) -> Optional[float]:
        return None if self.time_budget is None else parse_duration(self.time_budget,
                                                                    "time_budget")

    @property
    def scaled_learning_rate(self) -> float:
        return self.learning_rate * self.batch_size / self.reference_batch_size


@dataclasses.dataclass(frozen=True)
class RuntimeConfig:
    """Where and how the job runs: devices, precision, checkpoints, logging."""
    model_dir: str = flag("", "Checkpoints, TensorBoard events and config.json.")
    init_from: Optional[str] = flag(
        None, "Start a new run from the weights of another run's model directory (its best "
        "checkpoint, else its latest); optimizer, step and schedule start fresh. The "
        "architecture and the validation split must be the ones it was trained with. For "
        "fine-tuning, e.g. a second, distillation phase (--exit_distillation) after a "
        "first one. Its weights are not read when --model_dir has a checkpoint to resume.",
        kind="str")
    strategy: str = flag("default", "tf.distribute strategy.", choices=STRATEGIES)
    num_gpus: int = flag(0, "GPUs for mirrored/one_device (0: all).")
    num_cpu_devices: int = flag(
        0, "Split the host CPU into N logical devices (to exercise distribution without "
        "GPUs); 0 leaves it alone.")
    tpu: str = flag("", "TPU name or address for --strategy=tpu.")
    all_reduce: str = flag("auto", "Collective implementation for multi_worker_mirrored.",
                           choices=ALL_REDUCE)
    precision: str = flag("fp32", "fp32, mixed_float16 (NVIDIA GPUs, loss scaling) or "
                          "mixed_bfloat16.", choices=PRECISIONS)
    xla: bool = flag(False, "XLA-compile the per-replica forward and backward pass.")
    intra_op_threads: int = flag(0, "Threads one op may use; 0: TensorFlow's default (every "
                                 "core).")
    inter_op_threads: int = flag(0, "Ops TensorFlow runs at once; 0: its default.")
    training_layout: str = flag(
        "sliced", "How the RANet is laid out while it trains; the function and the variables "
        "are the same, so checkpoints load in either. sliced: later stages slice channel "
        "prefixes of earlier features; serving: every cross-stage feature is its own output "
        "and average pooling a depthwise convolution (faster on a CPU, BUILD_NOTES.md).",
        choices=("sliced", "serving"))
    seed: int = flag(0, "Seed of initialisation, data order and augmentation.")
    deterministic: bool = flag(False, "Deterministic ops (slower).")
    checkpoint_every_steps: int = flag(1000, "Checkpoint interval.")
    keep_checkpoints: int = flag(3, "How many recent checkpoints to keep.")
    eval_every_epochs: int = flag(1, "Validation interval in epochs.")
    log_every_steps: int = flag(100, "Logging and summary interval.")
    stop_at_step: Optional[int] = flag(
        None, "End this invocation (with a checkpoint) once the global step reaches N; the "
        "schedule still spans the whole run, and running again resumes. For time-boxed "
        "jobs. 0: run to the end.", kind="int", unset=0)
    collective_timeout_seconds: float = flag(
        300.0, "multi_worker_mirrored: a collective (all-reduce) that waits longer than this "
        "on a worker that is alive but stuck fails the run, with exit status 144; a worker "
        "that dies is noticed by heartbeats in ~10 s anyway. Longer than the slowest "
        "checkpoint save or evaluation skew between workers. 0: wait forever.")

    def __post_init__(self):
        require(self.collective_timeout_seconds >= 0,
                "collective_timeout_seconds must be >= 0 (0: no timeout). Received: "
                f"collective_timeout_seconds={self.collective_timeout_seconds}")
        require(self.init_from is None or self.init_from.strip() != "",
                "init_from must name a model directory written by ranet.train. Received: "
                f"init_from={self.init_from!r}")
        require(self.init_from is None or not self.model_dir or os.path.abspath(
                    self.init_from) != os.path.abspath(self.model_dir),
                f"init_from={self.init_from} is --model_dir itself: a run resumes from its own "
                "checkpoints without --init_from; pass another run's model directory.")
        require(self.stop_at_step is None or self.stop_at_step > 0,
                f"stop_at_step must be positive. Received: stop_at_step={self.stop_at_step}")
        check_choice("strategy", self.strategy, STRATEGIES)
        check_choice("precision", self.precision, PRECISIONS)
        check_choice("all_reduce", self.all_reduce, ALL_REDUCE)
        check_choice("training_layout", self.training_layout, ("sliced", "serving"))
        for field in ("num_gpus", "num_cpu_devices", "intra_op_threads", "inter_op_threads"):
            require(getattr(self, field) >= 0,
                    f"{field} must be >= 0. Received: {field}={getattr(self, field)}")
        for field in ("checkpoint_every_steps", "keep_checkpoints", "eval_every_epochs",
                      "log_every_steps"):
            require(getattr(self, field) > 0,
                    f"{field} must be positive. Received: {field}={getattr(self, field)}")


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    data: DataConfig
    model: ModelConfig
    optim: OptimConfig
    runtime: RuntimeConfig

    def __post_init__(self):
        require(self.model.num_classes == self.data.num_classes,
                f"model.num_classes ({self.model.num_classes}) does not match dataset "
                f"{self.data.dataset} ({self.data.num_classes} classes)")


@dataclasses.dataclass(frozen=True)
class StepPlan:
    """A run's durations in steps: what the schedule, the loop and the evaluations follow."""
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    decay_steps: tuple          # multistep: the steps after which the rate drops
    eval_every_steps: int


# A run with a time budget trains this many steps until it has measured its speed: the
# schedule then sits at its peak (or in its warm-up), as it does early in any long run.
UNPLANNED_STEPS = 10 ** 9


def plan_steps(optim: OptimConfig, runtime: RuntimeConfig, steps_per_epoch: int,
               total_steps: Optional[int] = None) -> StepPlan:
    """Turns epochs, fractions and intervals into steps, for ``steps_per_epoch`` of data.

    ``total_steps``: the steps a time budget planned (``ranet.training.budget``); before the
    plan exists a budgeted run counts ``UNPLANNED_STEPS``. Epoch-based runs decay at epoch
    boundaries, as the reference's per-epoch schedule does; a run given in steps or time
    decays at those fractions of its steps.
    """
    epoch_based = optim.train_steps is None and optim.time_budget is None
    if total_steps is None:
        total_steps = (UNPLANNED_STEPS if optim.time_budget is not None else
                       optim.train_steps or optim.epochs * steps_per_epoch)
    if epoch_based:
        decay = sorted({round(f * optim.epochs) * steps_per_epoch for f in optim.decay_fractions})
    else:
        decay = sorted({int(f * total_steps) for f in optim.decay_fractions})
    return StepPlan(steps_per_epoch=steps_per_epoch, total_steps=total_steps,
                    warmup_steps=min(int(optim.warmup_epochs * steps_per_epoch), total_steps - 1),
                    decay_steps=tuple(decay),
                    eval_every_steps=runtime.eval_every_epochs * steps_per_epoch)


def to_dict(config) -> dict:
    return dataclasses.asdict(config)


def save(config: ExperimentConfig, directory: str) -> str:
    return jsonio.write(os.path.join(directory, CONFIG_FILENAME), to_dict(config))


def load(directory: str) -> ExperimentConfig:
    """The configuration a model directory was trained with."""
    path = os.path.join(directory, CONFIG_FILENAME)
    if not os.path.exists(path):
        raise MissingPathError(
            f"{path} does not exist: {directory} is not a model directory written by ranet.train")
    how_to_fix = ("It is the configuration ranet.train wrote for this model directory: restore "
                  "it from a backup, or write it again by running ranet.train with the same "
                  "flags and --model_dir (training resumes from the checkpoints).")
    raw = jsonio.read(path, how_to_fix)
    if isinstance(raw, dict) and isinstance(raw.get("model"), dict):
        # Written before strided convolutions padded as PyTorch does: they padded as "same".
        raw["model"].setdefault("conv_padding", "same")
    sections = {"data": DataConfig, "model": ModelConfig, "optim": OptimConfig,
                "runtime": RuntimeConfig}
    try:
        return ExperimentConfig(**{name: cls(**raw[name]) for name, cls in sections.items()})
    except (KeyError, TypeError, ValueError) as error:
        raise UsageError(f"{path} does not hold a valid configuration ({type(error).__name__}: "
                         f"{error}). {how_to_fix}") from None

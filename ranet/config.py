"""Frozen, validated configuration objects: one per concern.

The binaries turn flags into these once; library modules never read ``FLAGS``.
Every object round-trips through JSON so that a model directory records the
exact configuration it was trained with (``<model_dir>/config.json``).
"""

import dataclasses
import json
import os
from typing import Any, Optional

DATASETS = ("cifar10", "cifar100", "synthetic")
MODELS = ("ranet", "vgg16", "resnet50")
STRATEGIES = ("default", "one_device", "mirrored", "multi_worker_mirrored", "tpu")
PRECISIONS = ("fp32", "mixed_float16", "mixed_bfloat16")
ALL_REDUCE = ("auto", "ring", "nccl")
SCHEDULES = ("multistep", "cosine")
STEP_MODES = ("even", "lg")
CONFIG_FILENAME = "config.json"

_NUM_CLASSES = {"cifar10": 10, "cifar100": 100, "synthetic": 10}


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _choice(name: str, value: Any, choices) -> None:
    _require(value in choices,
             f"{name} must be one of {', '.join(map(str, choices))}. Received: {name}={value!r}")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Which images, how many are held out for validation, how they are augmented."""
    dataset: str = "cifar10"
    data_dir: Optional[str] = None
    validation_size: int = 5000
    split_seed: int = 0
    augment: bool = True
    synthetic_train_size: int = 2048
    synthetic_test_size: int = 512

    def __post_init__(self):
        _choice("dataset", self.dataset, DATASETS)
        _require(self.validation_size >= 0,
                 f"validation_size must be >= 0. Received: validation_size={self.validation_size}")
        _require(self.synthetic_train_size > 0 and self.synthetic_test_size > 0,
                 "synthetic_train_size and synthetic_test_size must be positive. Received: "
                 f"{self.synthetic_train_size}, {self.synthetic_test_size}")

    @property
    def num_classes(self) -> int:
        return _NUM_CLASSES[self.dataset]

    @property
    def image_size(self) -> int:
        return 32


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture. The RANet fields mirror the reference's arguments (names spelled out)."""
    name: str = "ranet"
    num_classes: int = 10
    image_size: int = 32
    # RANet (reference argument in brackets).
    scale_list: tuple = (1, 2, 3)            # --scale-list
    growth_rate: int = 6                     # --growthRate
    growth_factors: tuple = (4, 2, 1)        # --grFactor
    bottleneck_factors: tuple = (4, 2, 1)    # --bnFactor
    base_channels: int = 16                  # --nChannels
    num_blocks: int = 2                      # --nBlocks
    block_step: int = 2                      # --block-step
    step: int = 4                            # --step
    step_mode: str = "even"                  # --stepmode
    compress_factor: float = 0.25            # --compress-factor
    reduction: float = 0.5                   # --reduction
    # Baselines.
    pretrained: Optional[str] = None
    # Every model: batch norm statistics over the global batch (all replicas), not per replica.
    sync_batch_norm: bool = False

    def __post_init__(self):
        _choice("model", self.name, MODELS)
        for field in ("scale_list", "growth_factors", "bottleneck_factors"):
            object.__setattr__(self, field, tuple(int(v) for v in getattr(self, field)))
        _require(self.num_classes > 1, f"num_classes must be > 1. Received: {self.num_classes}")
        _require(self.image_size >= 32 and self.image_size % 8 == 0,
                 f"image_size must be a multiple of 8, at least 32. Received: {self.image_size}")
        _choice("pretrained", self.pretrained, (None, "imagenet"))
        _require(self.pretrained is None or self.name == "resnet50",
                 f"--pretrained=imagenet exists only for resnet50. Received: model={self.name}")
        if self.name != "ranet":
            return
        scales = self.scale_list
        _require(len(scales) >= 1 and scales[0] == 1 and
                 all(b - a in (0, 1) for a, b in zip(scales, scales[1:])),
                 "scale_list must start at 1 and rise by 0 or 1 per flow, e.g. 1-2-3 or 1-2-3-3. "
                 f"Received: scale_list={'-'.join(map(str, scales))}")
        _require(len(self.growth_factors) == len(scales) == len(self.bottleneck_factors),
                 "growth_factors and bottleneck_factors need one entry per scale flow "
                 f"({len(scales)}). Received: growth_factors={self.growth_factors}, "
                 f"bottleneck_factors={self.bottleneck_factors}")
        _require(self.image_size // 2 ** (max(scales) - 1) >= 4,
                 f"image_size {self.image_size} is too small for {max(scales)} resolutions")
        for field in ("growth_rate", "base_channels", "num_blocks", "step"):
            _require(getattr(self, field) > 0,
                     f"{field} must be positive. Received: {field}={getattr(self, field)}")
        _require(self.block_step >= 1 or len(scales) == 1,
                 "block_step must be >= 1 with several flows: each later flow's exits are its "
                 f"block_step plain blocks. Received: block_step={self.block_step}")
        _choice("step_mode", self.step_mode, STEP_MODES)
        if len(scales) > 1:
            smallest_growth = self.growth_rate * min(self.growth_factors[1:])
            _require(int(smallest_growth * self.compress_factor) >= 1,
                     "growth_rate x growth_factor x compress_factor must be >= 1 for every "
                     "fusing flow, or its fusion layers get no channels. Received: "
                     f"growth_rate={self.growth_rate}, growth_factors={self.growth_factors}, "
                     f"compress_factor={self.compress_factor}")
        _require(0 < self.compress_factor < 1 and 0 < self.reduction <= 1,
                 "compress_factor must be in (0, 1) and reduction in (0, 1]. Received: "
                 f"compress_factor={self.compress_factor}, reduction={self.reduction}")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """Optimizer, schedule and duration. Defaults are the reference CIFAR recipe."""
    batch_size: int = 64                     # global, over all replicas
    epochs: int = 300
    train_steps: Optional[int] = None        # overrides epochs when set
    learning_rate: float = 0.1               # at reference_batch_size, scaled linearly
    reference_batch_size: int = 64
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 1e-4               # coupled L2, as PyTorch's SGD(weight_decay=)
    schedule: str = "multistep"
    decay_rate: float = 0.1
    decay_fractions: tuple = (0.5, 0.75)
    warmup_epochs: float = 0.0
    exit_weights: Optional[tuple] = None     # None: the plain sum over exits
    label_smoothing: float = 0.0

    def __post_init__(self):
        object.__setattr__(self, "decay_fractions", tuple(float(v) for v in self.decay_fractions))
        if self.exit_weights is not None:
            object.__setattr__(self, "exit_weights", tuple(float(v) for v in self.exit_weights))
        _require(self.batch_size > 0, f"batch_size must be positive. Received: {self.batch_size}")
        _require(self.epochs > 0, f"epochs must be positive. Received: epochs={self.epochs}")
        _require(self.train_steps is None or self.train_steps > 0,
                 f"train_steps must be positive. Received: train_steps={self.train_steps}")
        _require(self.learning_rate > 0, f"learning_rate must be positive. Received: {self.learning_rate}")
        _require(self.weight_decay >= 0, f"weight_decay must be >= 0. Received: {self.weight_decay}")
        _choice("schedule", self.schedule, SCHEDULES)
        _require(all(0 < f < 1 for f in self.decay_fractions),
                 f"decay_fractions must lie in (0, 1). Received: {self.decay_fractions}")
        _require(self.warmup_epochs >= 0, f"warmup_epochs must be >= 0. Received: {self.warmup_epochs}")
        _require(self.warmup_epochs == 0 or self.schedule == "cosine",
                 "warm-up exists for the cosine schedule only: pass --schedule=cosine. "
                 f"Received: schedule={self.schedule}, warmup_epochs={self.warmup_epochs}")
        _require(0 <= self.label_smoothing < 1,
                 f"label_smoothing must be in [0, 1). Received: {self.label_smoothing}")

    @property
    def scaled_learning_rate(self) -> float:
        return self.learning_rate * self.batch_size / self.reference_batch_size


@dataclasses.dataclass(frozen=True)
class RuntimeConfig:
    """Where and how the job runs: devices, precision, checkpoints, logging."""
    model_dir: str = ""
    strategy: str = "default"
    num_gpus: int = 0
    num_cpu_devices: int = 0
    tpu: str = ""
    all_reduce: str = "auto"
    precision: str = "fp32"
    xla: bool = False
    seed: int = 0
    deterministic: bool = False
    checkpoint_every_steps: int = 1000
    keep_checkpoints: int = 3
    eval_every_epochs: int = 1
    log_every_steps: int = 100
    stop_at_step: Optional[int] = None       # end this invocation early; the schedule is unchanged
    collective_timeout_seconds: float = 300.0  # multi-worker: a stuck peer ends the run; 0: wait

    def __post_init__(self):
        _require(self.collective_timeout_seconds >= 0,
                 "collective_timeout_seconds must be >= 0 (0: no timeout). Received: "
                 f"collective_timeout_seconds={self.collective_timeout_seconds}")
        _require(self.stop_at_step is None or self.stop_at_step > 0,
                 f"stop_at_step must be positive. Received: stop_at_step={self.stop_at_step}")
        _require(bool(self.model_dir), "model_dir is required: pass --model_dir=/path/to/run")
        _choice("strategy", self.strategy, STRATEGIES)
        _choice("precision", self.precision, PRECISIONS)
        _choice("all_reduce", self.all_reduce, ALL_REDUCE)
        for field in ("num_gpus", "num_cpu_devices"):
            _require(getattr(self, field) >= 0,
                     f"{field} must be >= 0. Received: {field}={getattr(self, field)}")
        for field in ("checkpoint_every_steps", "keep_checkpoints", "eval_every_epochs",
                      "log_every_steps"):
            _require(getattr(self, field) > 0,
                     f"{field} must be positive. Received: {field}={getattr(self, field)}")


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    data: DataConfig
    model: ModelConfig
    optim: OptimConfig
    runtime: RuntimeConfig

    def __post_init__(self):
        _require(self.model.num_classes == self.data.num_classes,
                 f"model.num_classes ({self.model.num_classes}) does not match dataset "
                 f"{self.data.dataset} ({self.data.num_classes} classes)")


def to_dict(config) -> dict:
    return dataclasses.asdict(config)


def save(config: ExperimentConfig, directory: str) -> str:
    path = os.path.join(directory, CONFIG_FILENAME)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(to_dict(config), f, indent=2, sort_keys=True)
    os.replace(tmp, path)
    return path


def load(directory: str) -> ExperimentConfig:
    path = os.path.join(directory, CONFIG_FILENAME)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"{path} does not exist: {directory} is not a model directory written by ranet.train")
    with open(path) as f:
        raw = json.load(f)
    return ExperimentConfig(data=DataConfig(**raw["data"]), model=ModelConfig(**raw["model"]),
                            optim=OptimConfig(**raw["optim"]), runtime=RuntimeConfig(**raw["runtime"]))

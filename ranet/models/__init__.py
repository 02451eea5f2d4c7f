"""Model registry: ``get_model(config)`` builds any registered staged classifier.

Each model module holds its builder and the checks of its own architecture arguments.
"""

import dataclasses
from typing import Callable, Dict, Optional

from ranet.config import ModelConfig, check_choice
from ranet.errors import UsageError
from ranet.models import baselines, msdnet, ranet
from ranet.models.layers import (conv_padding, gradient_equilibrium, serving_layout,
                                 synchronized_batch_norm)
from ranet.models.staged import ExitInfo, StagedClassifier, freeze_trunk


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    build: Callable[[ModelConfig], StagedClassifier]
    validate: Optional[Callable[[ModelConfig], None]] = None
    # Where exits share a trunk: freezes it, leaving the exits' classifiers trainable.
    freeze_trunk: Optional[Callable[[StagedClassifier], None]] = None


_REGISTRY: Dict[str, ModelSpec] = {
    "ranet": ModelSpec(ranet.build_ranet, ranet.validate, freeze_trunk),
    "msdnet": ModelSpec(msdnet.build_msdnet, msdnet.validate, freeze_trunk),
    "vgg16": ModelSpec(baselines.build_vgg16),
    "resnet50": ModelSpec(baselines.build_resnet50),
    "mobilenet_v2": ModelSpec(baselines.build_mobilenet_v2),
}
MODEL_NAMES = tuple(_REGISTRY)


def validate(config: ModelConfig) -> None:
    """Raises ``UsageError`` when ``config`` does not describe a model this registry builds."""
    check_choice("model", config.name, MODEL_NAMES)
    spec = _REGISTRY[config.name]
    if spec.validate is not None:
        spec.validate(config)


def check_trainable(config: ModelConfig, trainable: str) -> None:
    """Raises ``UsageError`` when ``trainable`` (--trainable) does not apply to the model."""
    if trainable == "classifiers" and _REGISTRY[config.name].freeze_trunk is None:
        raise UsageError(f"--trainable=classifiers freezes the trunk that a model's exits "
                         f"share; {config.name} has one exit and no shared trunk. Train it "
                         "with --trainable=all.")


def set_trainable(config: ModelConfig, model: StagedClassifier, trainable: str) -> None:
    """Applies --trainable to a model built from ``config``."""
    check_trainable(config, trainable)
    if trainable == "classifiers":
        _REGISTRY[config.name].freeze_trunk(model)


def get_model(config: ModelConfig) -> StagedClassifier:
    """Builds the model under the current Keras dtype policy (set precision first)."""
    validate(config)
    with synchronized_batch_norm(config.sync_batch_norm), conv_padding(config.conv_padding):
        return _REGISTRY[config.name].build(config)


__all__ = ["ExitInfo", "MODEL_NAMES", "StagedClassifier", "check_trainable", "get_model",
           "gradient_equilibrium", "serving_layout", "set_trainable", "validate"]

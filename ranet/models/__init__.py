"""Model registry: ``get_model(config)`` builds any registered staged classifier.

Each model module holds its builder and the checks of its own architecture arguments.
"""

import dataclasses
from typing import Callable, Dict, Optional

from ranet.config import ModelConfig, check_choice
from ranet.models import baselines, ranet
from ranet.models.layers import (conv_padding, gradient_equilibrium, serving_layout,
                                 synchronized_batch_norm)
from ranet.models.staged import ExitInfo, StagedClassifier


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    build: Callable[[ModelConfig], StagedClassifier]
    validate: Optional[Callable[[ModelConfig], None]] = None


_REGISTRY: Dict[str, ModelSpec] = {
    "ranet": ModelSpec(ranet.build_ranet, ranet.validate),
    "vgg16": ModelSpec(baselines.build_vgg16),
    "resnet50": ModelSpec(baselines.build_resnet50),
}
MODEL_NAMES = tuple(_REGISTRY)


def validate(config: ModelConfig) -> None:
    """Raises ``ValueError`` when ``config`` does not describe a model this registry builds."""
    check_choice("model", config.name, MODEL_NAMES)
    spec = _REGISTRY[config.name]
    if spec.validate is not None:
        spec.validate(config)


def get_model(config: ModelConfig) -> StagedClassifier:
    """Builds the model under the current Keras dtype policy (set precision first)."""
    validate(config)
    with synchronized_batch_norm(config.sync_batch_norm), conv_padding(config.conv_padding):
        return _REGISTRY[config.name].build(config)


__all__ = ["ExitInfo", "MODEL_NAMES", "StagedClassifier", "get_model", "gradient_equilibrium",
           "serving_layout", "validate"]

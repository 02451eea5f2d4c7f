"""Model registry: ``get_model(config)`` builds any registered staged classifier."""

from typing import Callable, Dict

from ranet.config import ModelConfig
from ranet.models.baselines import build_resnet50, build_vgg16
from ranet.models.ranet import build_ranet
from ranet.models.staged import ExitInfo, StagedClassifier, synchronized_batch_norm

_REGISTRY: Dict[str, Callable[[ModelConfig], StagedClassifier]] = {
    "ranet": build_ranet,
    "vgg16": build_vgg16,
    "resnet50": build_resnet50,
}
MODEL_NAMES = tuple(_REGISTRY)


def get_model(config: ModelConfig) -> StagedClassifier:
    """Builds the model under the current Keras dtype policy (set precision first)."""
    if config.name not in _REGISTRY:
        raise ValueError(f"Unknown model. Expected one of {', '.join(MODEL_NAMES)}. "
                         f"Received: model={config.name!r}")
    with synchronized_batch_norm(config.sync_batch_norm):
        return _REGISTRY[config.name](config)


__all__ = ["ExitInfo", "MODEL_NAMES", "StagedClassifier", "get_model"]

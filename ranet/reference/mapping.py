"""Which tensor of a reference checkpoint fills which variable here.

The ports name their layers after the references' modules (``ranet.models.ranet``,
``ranet.models.msdnet``), so the mapping is a rule on names, one per kind of layer, not a
table.

RANet (yangle15/RANet-pytorch):

==========================================  =================================================
port layer                                  reference module
==========================================  =================================================
``stem{f}``                                 ``FirstLayer.layers.{F-1-f}`` (F flows; the stem
                                            builds the highest resolution, flow F-1, first;
                                            on ImageNet that one is a plain Sequential with
                                            a biased 7x7 conv)
``flow{f}_block{b}_layer{j}_{1x1,3x3}``     ``scale_flows.{f}.{b-1}.layers.{j}.conv_normal``
``flow{f}_block{b}_layer{j}_normal_*``      the same (a fusing layer's own path)
``flow{f}_block{b}_layer{j}_up_*``          ``scale_flows.{f}.{b-1}.layers.{j}.conv_up``
``flow{f}_block{b}_last``                   ``scale_flows.{f}.{b-1}.conv_last``
``flow{f}_block{b}_transition``             ``scale_flows.{f}.{b-1}.trans``
==========================================  =================================================

MSDNet (kalviny/MSDNet-PyTorch), ``i`` = s minus the layer's first output scale:

==================================================  =========================================
port layer                                          reference module
==================================================  =========================================
``block1_layer0_scale{s}``                          ``blocks.0.0.layers.{s}`` (``.net`` but
                                                    for the ImageNet 7x7 Sequential)
``block{b}_layer{p}_scale{s}_{normal,down}_*``      ``blocks.{b-1}.{p}.layers.{i}.conv_*``
``block{b}_layer{p}_scale{s}_transition``           ``blocks.{b-1}.{p}.m.{i}``
==================================================  =========================================

Both: ``exit{k}_conv{1,2}`` is ``classifier.{k-1}.m.{0,1}``, ``exit{k}_logits``
``classifier.{k-1}.linear``. Inside a ConvBN (bottleneck) the 1x1 convolution and its batch
norm are ``net.0``/``net.1`` and the 3x3 ones ``net.3``/``net.4`` (``net.0``/``net.1``
without a bottleneck); a ConvBasic is ``net.0``/``net.1``. Layouts: PyTorch convolutions are
OIHW, Keras' HWIO; a linear layer's weight is (out, in), a Dense kernel (in, out).
"""

import dataclasses
import re
from typing import Callable, Dict, List, Mapping, Tuple

import numpy as np

from ranet.config import ModelConfig
from ranet.errors import UsageError
from ranet.models import msdnet
from ranet.models.staged import StagedClassifier

# Buffers the reference saves that have no counterpart: batch norm counts the batches it saw
# only to derive a momentum when momentum=None, which the reference never sets.
IGNORED_SUFFIXES = (".num_batches_tracked",)
DATA_PARALLEL_PREFIX = "module."

_BOTTLENECK_INDEX = {"1x1": (0, 1), "3x3": (3, 4)}


def _exit_module_of(layer_base: str) -> Tuple[str, int, int]:
    match = re.fullmatch(r"exit(\d+)_conv([12])", layer_base)
    if match:
        exit_index, conv = match.groups()
        return f"classifier.{int(exit_index) - 1}.m.{int(conv) - 1}.net", 0, 1
    raise KeyError(layer_base)


def _ranet_module_of(layer_base: str, config: ModelConfig) -> Tuple[str, int, int]:
    """(reference module, index of its conv, index of its batch norm) for a port conv_bn_relu."""
    match = re.fullmatch(r"stem(\d+)", layer_base)
    if match:
        layer = len(config.scale_list) - 1 - int(match.group(1))
        if layer == 0 and config.imagenet:  # a Sequential of its own, not a ConvBasic
            return "FirstLayer.layers.0", 0, 1
        return f"FirstLayer.layers.{layer}.net", 0, 1
    match = re.fullmatch(r"flow(\d+)_block(\d+)_layer(\d+)_(?:(normal|up)_)?(1x1|3x3)",
                         layer_base)
    if match:
        flow, block, layer, path, kernel = match.groups()
        branch = "conv_up" if path == "up" else "conv_normal"
        conv, bn = _BOTTLENECK_INDEX[kernel]
        return (f"scale_flows.{flow}.{int(block) - 1}.layers.{layer}.{branch}.net", conv, bn)
    match = re.fullmatch(r"flow(\d+)_block(\d+)_(last|transition)", layer_base)
    if match:
        flow, block, kind = match.groups()
        module = "conv_last" if kind == "last" else "trans"
        return f"scale_flows.{flow}.{int(block) - 1}.{module}.net", 0, 1
    return _exit_module_of(layer_base)


def _msdnet_module_of(layer_base: str, config: ModelConfig) -> Tuple[str, int, int]:
    """(reference module, index of its conv, index of its batch norm) for a port conv_bn_relu."""
    match = re.fullmatch(r"block1_layer0_scale(\d+)", layer_base)
    if match:
        scale = int(match.group(1))
        if scale == 0 and config.imagenet:  # a Sequential of its own, not a ConvBasic
            return "blocks.0.0.layers.0", 0, 1
        return f"blocks.0.0.layers.{scale}.net", 0, 1
    match = re.fullmatch(
        r"block(\d+)_layer(\d+)_scale(\d+)_(?:(normal|down)_(1x1|3x3)|transition)", layer_base)
    if not match:
        return _exit_module_of(layer_base)
    block, position, scale, path, kernel = match.groups()
    block, position, scale = int(block), int(position), int(scale)
    planned = {p.position: p for p in msdnet.layer_plan(config)[block - 1]}.get(position)
    if planned is None or not planned.offset <= scale < planned.num_scales:
        raise KeyError(layer_base)
    module = f"blocks.{block - 1}.{position}"
    branch = scale - planned.offset
    if path is None:
        return f"{module}.m.{branch}.net", 0, 1
    conv, bn = _BOTTLENECK_INDEX[kernel] if config.bottleneck else (0, 1)
    return f"{module}.layers.{branch}.conv_{path}.net", conv, bn


def _msdnet_unread_modules(config: ModelConfig) -> Tuple[str, ...]:
    """The reference modules of ``msdnet.unread_branches``: computed there, read by no exit."""
    plans = msdnet.layer_plan(config)
    prefixes = []
    for block, position, scale in msdnet.unread_branches(config):
        planned = next(p for p in plans[block - 1] if p.position == position)
        kind = "layers" if planned.kind == "layer" else "m"
        prefixes.append(f"blocks.{block - 1}.{position}.{kind}.{scale - planned.offset}.")
    return tuple(prefixes)


_MODULE_OF = {"ranet": _ranet_module_of, "msdnet": _msdnet_module_of}
# Modules of a reference checkpoint that the port does not build, because no exit reads them.
_UNREAD_MODULES = {"ranet": lambda config: (), "msdnet": _msdnet_unread_modules}
IMPORTABLE_MODELS = tuple(_MODULE_OF)


def unread_keys(state_dict: Mapping[str, np.ndarray], config: ModelConfig) -> List[str]:
    """The tensors of ``state_dict`` (without ``module.``) of modules no exit reads."""
    prefixes = _UNREAD_MODULES[config.name](config)
    return sorted(key for key in state_dict if prefixes and key.startswith(prefixes))


def _oihw_to_hwio(tensor: np.ndarray) -> np.ndarray:
    return tensor.transpose(2, 3, 1, 0)


def _identity(tensor: np.ndarray) -> np.ndarray:
    return tensor


def _transposed(tensor: np.ndarray) -> np.ndarray:
    return tensor.T


@dataclasses.dataclass(frozen=True)
class Source:
    """A reference tensor and how to lay it out as a port variable."""
    key: str
    convert: Callable[[np.ndarray], np.ndarray]


def reference_source(variable_path: str, config: ModelConfig) -> Source:
    """The reference tensor behind the port variable ``<layer>/<weight>``; KeyError if none."""
    layer, _, weight = variable_path.rpartition("/")
    match = re.fullmatch(r"exit(\d+)_logits", layer)
    if match:
        prefix = f"classifier.{int(match.group(1)) - 1}.linear"
        return {"kernel": Source(f"{prefix}.weight", _transposed),
                "bias": Source(f"{prefix}.bias", _identity)}[weight]
    base, _, kind = layer.rpartition("_")
    module, conv, bn = _MODULE_OF[config.name](base, config)
    if kind == "conv":
        return {"kernel": Source(f"{module}.{conv}.weight", _oihw_to_hwio),
                "bias": Source(f"{module}.{conv}.bias", _identity)}[weight]
    if kind == "bn":
        return {"gamma": Source(f"{module}.{bn}.weight", _identity),
                "beta": Source(f"{module}.{bn}.bias", _identity),
                "moving_mean": Source(f"{module}.{bn}.running_mean", _identity),
                "moving_variance": Source(f"{module}.{bn}.running_var", _identity)}[weight]
    raise KeyError(variable_path)


class MappingError(UsageError):
    """The checkpoint and the model do not correspond one to one."""


def strip_data_parallel(state_dict: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """Keys without DataParallel's ``module.`` prefix (when every key has it)."""
    if state_dict and all(key.startswith(DATA_PARALLEL_PREFIX) for key in state_dict):
        return {key[len(DATA_PARALLEL_PREFIX):]: value for key, value in state_dict.items()}
    return dict(state_dict)


def assignments(model: StagedClassifier, state_dict: Mapping[str, np.ndarray],
                config: ModelConfig) -> List[Tuple[object, np.ndarray]]:
    """(variable, value) for every variable of ``model``, from the reference ``state_dict``.

    Every reference tensor must be used exactly once (``IGNORED_SUFFIXES`` and
    ``unread_keys`` aside), every variable filled, and shapes equal; otherwise
    ``MappingError`` lists every mismatch.
    """
    state_dict = strip_data_parallel(state_dict)
    problems, pairs, used = [], [], {}
    for variable in model.variables:
        try:
            source = reference_source(variable.path, config)
        except KeyError:
            problems.append(f"no reference tensor corresponds to {variable.path}")
            continue
        if source.key not in state_dict:
            problems.append(f"{variable.path} needs {source.key}, which the checkpoint lacks")
            continue
        if source.key in used:
            problems.append(f"{source.key} would fill both {used[source.key]} and "
                            f"{variable.path}")
            continue
        used[source.key] = variable.path
        value = source.convert(np.asarray(state_dict[source.key]))
        if tuple(value.shape) != tuple(variable.shape):
            problems.append(f"{source.key} has shape {tuple(value.shape)} (as {variable.path}: "
                            f"expected {tuple(variable.shape)})")
            continue
        pairs.append((variable, value.astype(np.float32)))
    unread = set(unread_keys(state_dict, config))
    unused = sorted(key for key in state_dict
                    if key not in used and key not in unread and not key.endswith(IGNORED_SUFFIXES))
    problems += [f"{key} {tuple(np.shape(state_dict[key]))} is not used by any variable"
                 for key in unused]
    if problems:
        raise MappingError(f"the checkpoint does not match the model ({len(problems)} "
                           "problems); are the architecture flags those it was trained with?\n  "
                           + "\n  ".join(problems))
    return pairs

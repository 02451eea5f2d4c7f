"""Parameter and multiply-add counts, counted the way the RANet reference counts them.

The reference's ``op_counter.py`` counts, per image: conv multiply-adds
(Cin * Cout * kh * kw * Hout * Wout / groups), linear weights plus biases, one
op per ReLU output element, and kernel-size ops per pooling output element;
batch norm, interpolation, concatenation and additions count nothing.
Parameters are the trainable ones (PyTorch has no moving statistics among
its parameters). Costs are cumulative: exit k pays for every stage up to k.
"""

import dataclasses
import math
from typing import List

import keras
from keras import layers

from ranet.models.layers import BilinearResize, GradientRescale
from ranet.models.staged import StagedClassifier

_FREE_LAYERS = (layers.InputLayer, layers.BatchNormalization, layers.Concatenate, layers.Add,
                layers.Flatten, layers.ZeroPadding2D, layers.Dropout, BilinearResize,
                GradientRescale)


@dataclasses.dataclass(frozen=True)
class ExitCost:
    exit: int
    macs: int      # cumulative multiply-adds per image up to and including this exit
    params: int    # cumulative trainable parameters up to and including this exit


@dataclasses.dataclass(frozen=True)
class ModelCost:
    model: str
    params: int
    exits: List[ExitCost]

    def to_json(self) -> dict:
        return {"model": self.model, "params": self.params,
                "exits": [{"exit": e.exit, "macs": e.macs, "params": e.params} for e in self.exits]}


def _numel(shape) -> int:
    return math.prod(int(d) for d in shape[1:])


def _layer_macs(layer, node) -> int:
    out_shape = node.output_tensors[0].shape
    if isinstance(layer, layers.Conv2D):
        in_channels = node.input_tensors[0].shape[-1]
        kh, kw = layer.kernel_size
        return in_channels * layer.filters * kh * kw * out_shape[1] * out_shape[2] // layer.groups
    if isinstance(layer, layers.DepthwiseConv2D):
        kh, kw = layer.kernel_size
        return (node.input_tensors[0].shape[-1] * layer.depth_multiplier * kh * kw
                * out_shape[1] * out_shape[2])
    if isinstance(layer, layers.Dense):
        return int(layer.kernel.shape[0]) * layer.units + (layer.units if layer.use_bias else 0)
    if isinstance(layer, layers.ReLU) or (isinstance(layer, layers.Activation)
                                          and layer.activation is keras.activations.relu):
        return _numel(out_shape)
    if isinstance(layer, (layers.AveragePooling2D, layers.MaxPooling2D)):
        return _numel(out_shape) * math.prod(layer.pool_size)
    if isinstance(layer, layers.GlobalAveragePooling2D):
        return _numel(node.input_tensors[0].shape)
    if isinstance(layer, _FREE_LAYERS) or (isinstance(layer, layers.Activation)
                                           and layer.activation is keras.activations.linear):
        return 0
    raise TypeError(f"The cost counter does not know layer type {type(layer).__name__} "
                    f"(layer {layer.name!r}); add a rule to ranet/costs.py.")


def _graph_macs(model: keras.Model) -> int:
    """Multiply-adds of one image through a functional model, nested models included."""
    total = 0
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            total += _graph_macs(layer)
        else:
            total += _layer_macs(layer, layer._inbound_nodes[0])
    return total


def _trainable_params(model: keras.Model) -> int:
    return sum(math.prod(v.shape) for v in model.trainable_weights)


def count(model: StagedClassifier) -> ModelCost:
    """Params and per-exit cumulative multiply-adds of a built staged model."""
    exits, macs, params = [], 0, 0
    for info, stage in zip(model.exits, model.stages):
        macs += _graph_macs(stage)
        params += _trainable_params(stage)
        exits.append(ExitCost(exit=info.index, macs=int(macs), params=int(params)))
    return ModelCost(model=model.name, params=int(params), exits=exits)


def format_table(cost: ModelCost) -> str:
    lines = [f"{cost.model}: {cost.params:,} parameters ({cost.params / 1e6:.2f} M)",
             f"{'exit':>4}  {'cumulative MACs':>16}  {'MMACs':>8}  {'cumulative params':>17}"]
    for e in cost.exits:
        lines.append(f"{e.exit:>4}  {e.macs:>16,}  {e.macs / 1e6:>8.2f}  {e.params:>17,}")
    return "\n".join(lines)

"""Cuts a part out of a LiteRT (.tflite) graph: the operators between given tensors.

Why cut rather than convert each part on its own: the export converts (and, in int8,
calibrates) the whole network once, with every exit's logits and every feature that crosses a
stage as named outputs, and cuts every file it ships from that one graph. So

* a feature crossing a stage boundary is the producer's own tensor, int8 with the producer's
  scale in an int8 export: no boundary dequantizes and requantizes it;
* a stage file, a "from stage s to the end" file and the one-graph file hold the same
  operators on the same tensors with the same quantisation: every route through them computes
  the same numbers.

The converter has no option that does either (each conversion calibrates its own scales and
``inference_input_type`` applies to every input, pixels included), hence this module. It needs
only ``ai-edge-litert``.
"""

from typing import Dict, List, Set

from ai_edge_litert import schema_py_generated as schema
from ai_edge_litert.tools import flatbuffer_utils

SIGNATURE = "serving_default"


class Graph:
    """A .tflite file's main graph, its tensors found by signature name.

    Args:
        content: the bytes of a file with one subgraph and a ``serving_default`` signature.
    """

    def __init__(self, content: bytes):
        self._content = bytes(content)
        self.model = _parse(self._content)
        if len(self.model.subgraphs) != 1:
            raise ValueError("only single-graph files can be cut (no control flow). Received "
                             f"{len(self.model.subgraphs)} subgraphs")
        self.graph = self.model.subgraphs[0]
        signature = next(s for s in self.model.signatureDefs
                         if s.signatureKey.decode() == SIGNATURE)
        self.inputs = {m.name.decode(): m.tensorIndex for m in signature.inputs}
        self.outputs = {m.name.decode(): m.tensorIndex for m in signature.outputs}
        self._producer = {t: i for i, op in enumerate(self.graph.operators) for t in op.outputs}

    def boundary(self, output: str) -> int:
        """The tensor behind a named output as the graph computes it: in an int8 graph the
        int8 tensor its final DEQUANTIZE reads, else the output itself."""
        index = self.outputs[output]
        op = self._producer.get(index)
        if op is not None and self._opcode(op) == "DEQUANTIZE":
            return self.graph.operators[op].inputs[0]
        return index

    def _opcode(self, op: int) -> str:
        return flatbuffer_utils.opcode_to_name(self.model, self.graph.operators[op].opcodeIndex)

    def _is_constant(self, tensor: int) -> bool:
        buffer = self.graph.tensors[tensor].buffer
        data = self.model.buffers[buffer].data if buffer else None
        return data is not None and len(data) > 0

    def cut(self, inputs: Dict[str, int], outputs: Dict[str, int]) -> bytes:
        """A file computing ``outputs`` from ``inputs`` (signature name -> tensor index),
        with just the operators, tensors and weights that needs, in the original order."""
        given = set(inputs.values())
        needed, kept = set(outputs.values()) - given, []
        for i in reversed(range(len(self.graph.operators))):
            op = self.graph.operators[i]
            if not needed.intersection(op.outputs):
                continue
            kept.append(i)
            needed.difference_update(op.outputs)
            needed.update(t for t in op.inputs if t >= 0 and t not in given
                          and not self._is_constant(t))
        if needed:
            names = sorted(self.graph.tensors[t].name.decode() for t in needed)
            raise ValueError(f"the cut reads tensors no input provides: {names}")
        return self._write(sorted(kept), inputs, outputs)

    def _write(self, kept: List[int], inputs: Dict[str, int], outputs: Dict[str, int]) -> bytes:
        # Rewired on a fresh copy, so that this graph stays intact for the next cut.
        source = _parse(self._content)
        graph = source.subgraphs[0]
        operators = [graph.operators[i] for i in kept]
        used: Set[int] = set(inputs.values()) | set(outputs.values())
        for op in operators:
            used.update(t for t in [*op.inputs, *op.outputs, *(op.intermediates or [])] if t >= 0)
        tensor_map = {old: new for new, old in enumerate(sorted(used))}
        # Buffer 0 is the empty sentinel every file starts with; metadata keeps its buffers.
        kept_buffers = [0] + sorted({graph.tensors[t].buffer for t in used} - {0}
                                    | {m.buffer for m in source.metadata or []})
        buffer_map = {old: new for new, old in enumerate(kept_buffers)}

        tensors = []
        for old in sorted(used):
            tensor = graph.tensors[old]
            tensor.buffer = buffer_map[tensor.buffer]
            tensors.append(tensor)
        for op in operators:
            op.inputs = [tensor_map[t] if t >= 0 else t for t in op.inputs]
            op.outputs = [tensor_map[t] for t in op.outputs]
            if op.intermediates is not None:
                op.intermediates = [tensor_map[t] for t in op.intermediates]

        model = schema.ModelT()
        model.version, model.description = source.version, source.description
        model.operatorCodes = source.operatorCodes
        model.buffers = [source.buffers[b] for b in kept_buffers]
        model.metadata = []
        for entry in source.metadata or []:
            metadata = schema.MetadataT()
            metadata.name, metadata.buffer = entry.name, buffer_map[entry.buffer]
            model.metadata.append(metadata)
        cut = schema.SubGraphT()
        cut.name = graph.name
        cut.tensors, cut.operators = tensors, operators
        cut.inputs = [tensor_map[t] for t in inputs.values()]
        cut.outputs = [tensor_map[t] for t in outputs.values()]
        model.subgraphs = [cut]
        signature = schema.SignatureDefT()
        signature.signatureKey, signature.subgraphIndex = SIGNATURE.encode(), 0
        signature.inputs = [_tensor_map(name, tensor_map[t]) for name, t in inputs.items()]
        signature.outputs = [_tensor_map(name, tensor_map[t]) for name, t in outputs.items()]
        model.signatureDefs = [signature]
        return bytes(flatbuffer_utils.convert_object_to_bytearray(model))


def _parse(content: bytes) -> schema.ModelT:
    return flatbuffer_utils.convert_bytearray_to_object(bytearray(content))


def _tensor_map(name: str, index: int) -> schema.TensorMapT:
    entry = schema.TensorMapT()
    entry.name, entry.tensorIndex = name.encode(), index
    return entry

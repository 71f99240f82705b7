"""Small ONNX-level helpers the export steps share: finishing a graph, finding its weights, graph building.

Nothing here knows about artifacts: these are the plumbing of `compact`, `regen` and `int8`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..errors import MaskforgeError, first_line

WEIGHT_OPS = ("Conv", "Gemm", "MatMul")  # input 1 of these, when an initializer, is a weight
MAX_IR_VERSION = 10  # onnxruntime 1.32 refuses newer IR versions than it knows
# Shared scalar zeros of each weight type, the "dropped weight" value of the encodings.
ZERO_NAMES = {
    np.dtype(np.float32): "maskforge/zero_f32",
    np.dtype(np.int8): "maskforge/zero_i8",
    np.dtype(np.uint8): "maskforge/zero_u8",
}


def finalize(proto) -> None:
    """Pin the IR version to the lowest the opsets need, then run the ONNX checker."""
    import onnx

    standard = [entry for entry in proto.opset_import if entry.domain in ("", "ai.onnx", "ai.onnx.ml")]
    needed = onnx.helper.find_min_ir_version_for(standard)
    if len(proto.functions):
        needed = max(needed, 8)  # model-local functions arrived with IR version 8
    proto.ir_version = min(MAX_IR_VERSION, needed)
    try:
        onnx.checker.check_model(proto)
    except onnx.checker.ValidationError as exc:  # pragma: no cover - would be a maskforge bug
        raise MaskforgeError(f"the exported ONNX graph is invalid ({first_line(exc)})") from None


def default_opset(proto) -> int | None:
    """The model's default-domain (ai.onnx) opset version."""
    return next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)


@dataclass
class WeightRef:
    """A weight initializer and how the layer that consumes it lays it out."""

    name: str
    transposed: bool  # stored [in, out] (MatMul, Gemm without transB): the PyTorch weight transposed
    channel_axis: int  # the output-channel axis of the stored tensor (per-channel scales run along it)


def weight_refs(proto) -> list[WeightRef]:
    """Every weight of a Conv/Gemm/MatMul: a float initializer at input 1, or (QDQ models) the integer
    initializer behind the DequantizeLinear that feeds input 1. In graph order, each name once."""
    from onnx import TensorProto

    graph = proto.graph
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    dequantized = {node.output[0]: node.input[0] for node in graph.node if node.op_type == "DequantizeLinear"}
    refs: dict[str, WeightRef] = {}
    for node in graph.node:
        if node.op_type not in WEIGHT_OPS or len(node.input) < 2:
            continue
        name = node.input[1]
        name = name if name in initializers else dequantized.get(name, "")
        tensor = initializers.get(name)
        if tensor is None or len(tensor.dims) < 2 or name in refs:
            continue
        if tensor.data_type not in (TensorProto.FLOAT, TensorProto.INT8, TensorProto.UINT8):
            continue
        if node.op_type == "Conv":
            transposed = False
        elif node.op_type == "Gemm":
            transposed = not any(a.name == "transB" and a.i == 1 for a in node.attribute)
        else:
            transposed = True
        refs[name] = WeightRef(name, transposed, 1 if transposed else 0)
    return list(refs.values())


@dataclass
class Subgraph:
    """Nodes and initializers being built for one weight (names of initializers get `prefix`)."""

    prefix: str
    nodes: list = field(default_factory=list)
    tensors: list = field(default_factory=list)

    def init(self, suffix: str, array: np.ndarray) -> str:
        from onnx import numpy_helper

        name = f"{self.prefix}/{suffix}"
        self.tensors.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def node(self, op: str, inputs: list[str], output: str, domain: str = "", **attrs) -> str:
        from onnx import helper

        self.nodes.append(helper.make_node(op, inputs, [output], domain=domain, **attrs))
        return output


def replace_weights(proto, replaced: set[str], nodes: list, tensors: list) -> None:
    """Drop the `replaced` initializers, add `tensors`, and put `nodes` (which rebuild them) first."""
    graph = proto.graph
    kept = [tensor for tensor in graph.initializer if tensor.name not in replaced]
    del graph.initializer[:]
    graph.initializer.extend(kept + list(tensors))
    old_nodes = list(graph.node)
    del graph.node[:]
    graph.node.extend(list(nodes) + old_nodes)


def zero_tensors():
    """The initializers named in ZERO_NAMES (add those a graph uses)."""
    from onnx import numpy_helper

    for dtype, name in ZERO_NAMES.items():
        yield numpy_helper.from_array(np.zeros((), dtype=dtype), name)


def packed_bits(values: np.ndarray) -> np.ndarray:
    """Bit i of the flat input is bit (i mod 8), least significant first, of byte (i div 8)."""
    return np.packbits(np.asarray(values, dtype=bool).reshape(-1), bitorder="little")


def per_channel_magnitude(weight: np.ndarray, mask: np.ndarray) -> np.ndarray | None:
    """A magnitude array broadcastable to `weight` such that every kept |w| equals it, or None.

    Tried in order: one scalar (signed constant without batch norm), one value per index of axis 0 (a
    convolution with its batch norm folded in), one per index of the last axis. Kept means `mask`.
    """
    magnitude = np.abs(weight)
    if not mask.any():
        return None
    kept = magnitude[mask]
    if np.all(kept == kept[0]):
        return np.array(kept[0], dtype=weight.dtype)
    for axis in (0, weight.ndim - 1):
        reduce = tuple(a for a in range(weight.ndim) if a != axis)
        group = np.where(mask, magnitude, np.zeros((), weight.dtype)).max(axis=reduce, keepdims=True)
        if np.all(np.where(mask, magnitude == group, True)):
            return group.astype(weight.dtype)
    return None

"""Which operators an int8 export quantizes (`export/int8.py`), read back from the QDQ graph it writes.

A graph with a transformer's float-only operator (LayerNormalization here) quantizes its weight operators
only, except the first, which reads the image and stays float32; a graph with Sigmoid (SiLU,
squeeze-excitation) is quantized whole. The oracle is the written graph itself: a weight is quantized
when a DequantizeLinear produces the tensor its operator reads, an activation when a DequantizeLinear
produces it.
"""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from maskforge.export.int8 import quantize

CHANNELS = 4


def _exact_weight(shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """c_j x {-1, 0, +1} per output channel (axis 0), as maskforge's signed-constant layers are."""
    signs = rng.integers(-1, 2, size=shape).astype(np.float32)
    scales = rng.uniform(0.5, 2.0, size=(shape[0],) + (1,) * (len(shape) - 1)).astype(np.float32)
    return signs * scales


def _graph(middle_op: str):
    """input -> Conv c1 -> middle_op -> Conv c2 -> Flatten -> Gemm fc -> logits."""
    rng = np.random.default_rng(0)
    initializers = [
        numpy_helper.from_array(_exact_weight((CHANNELS, 1, 3, 3), rng), "w1"),
        numpy_helper.from_array(_exact_weight((CHANNELS, CHANNELS, 3, 3), rng), "w2"),
        numpy_helper.from_array(_exact_weight((3, CHANNELS * 16), rng), "w3"),
    ]
    if middle_op == "LayerNormalization":
        initializers.append(numpy_helper.from_array(np.ones(4, np.float32), "ln_scale"))
        middle = helper.make_node("LayerNormalization", ["a", "ln_scale"], ["b"], axis=-1)
    else:
        middle = helper.make_node(middle_op, ["a"], ["b"])
    nodes = [
        helper.make_node("Conv", ["input", "w1"], ["a"], name="c1", pads=[1, 1, 1, 1]),
        middle,
        helper.make_node("Conv", ["b", "w2"], ["c"], name="c2", pads=[1, 1, 1, 1]),
        helper.make_node("Flatten", ["c"], ["d"]),
        helper.make_node("Gemm", ["d", "w3"], ["logits"], name="fc", transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [None, 1, 4, 4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [None, 3])],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _quantized_inputs(proto) -> dict[str, tuple[bool, bool]]:
    """For each of c1, c2, fc (found by the weight it reads): (activation input quantized, weight quantized)."""
    producers = {out: node for node in proto.graph.node for out in node.output}
    found = {}
    for node in proto.graph.node:
        if node.op_type not in ("Conv", "Gemm"):
            continue
        activation, weight = (producers.get(name) for name in node.input[:2])
        weight_source = weight.input[0] if weight is not None else node.input[1]
        name = {"w1": "c1", "w2": "c2", "w3": "fc"}[weight_source.replace("_quantized", "")]
        found[name] = (
            activation is not None and activation.op_type == "DequantizeLinear",
            weight is not None and weight.op_type == "DequantizeLinear",
        )
    return found


@pytest.mark.parametrize(
    "middle_op,expected",
    [
        # weight operators only, the first (reading the image) in float
        ("LayerNormalization", {"c1": (False, False), "c2": (True, True), "fc": (True, True)}),
        # quantized whole
        ("Sigmoid", {"c1": (True, True), "c2": (True, True), "fc": (True, True)}),
        ("Relu", {"c1": (True, True), "c2": (True, True), "fc": (True, True)}),
    ],
)
def test_what_is_quantized(middle_op, expected):
    calibration = np.random.default_rng(1).standard_normal((16, 1, 4, 4)).astype(np.float32)
    quantized = quantize(_graph(middle_op), calibration, lossy=False)
    assert _quantized_inputs(quantized) == expected
    sigmoid_inputs = [n.input[0] for n in quantized.graph.node if n.op_type == "Sigmoid"]
    producers = {out: node.op_type for node in quantized.graph.node for out in node.output}
    assert all(producers[name] == "DequantizeLinear" for name in sigmoid_inputs)  # Sigmoid quantized too

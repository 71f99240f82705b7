"""The int8 kernel check (`export/kernels.py`) against exact integer arithmetic.

The case: a QDQ 1x1 convolution over C channels, every input 255 (scale 1, zero point 0) and every weight
127 (scale 1), so the exact accumulator is C x 255 x 127, with the output scale set so that the exact
result is 200 steps. Python's integers say when that accumulator leaves int32: from C = 66,314 on.
onnxruntime fuses the graph into a QLinearConv whose int32 accumulator then wraps (or, on AVX2 without
VNNI, whose int16 pair sums saturate first), while the unoptimized run sums in float and gets 200. The
check must pass where the fused kernel computes the exact result and name the tensor where it does not.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from maskforge.errors import MaskforgeError
from maskforge.export.kernels import KERNEL_MAX_STEPS, activation_quantizers, check_kernels
from maskforge.export.sessions import ort_session, run_session

PIXEL, WEIGHT, EXACT_STEPS = 255, 127, 200
INT32_MAX = 2**31 - 1


def one_conv(channels: int) -> onnx.ModelProto:
    """input -> Q -> DQ -> Conv (DQ of int8 weights) -> Q (tensor "conv_q") -> DQ -> output."""
    y_scale = np.float32(channels * PIXEL * WEIGHT / EXACT_STEPS)
    initializers = [
        numpy_helper.from_array(np.array(1.0, np.float32), "x_scale"),
        numpy_helper.from_array(np.array(0, np.uint8), "x_zero"),
        numpy_helper.from_array(np.full((1, channels, 1, 1), WEIGHT, np.int8), "w"),
        numpy_helper.from_array(np.array([1.0], np.float32), "w_scale"),
        numpy_helper.from_array(np.array([0], np.int8), "w_zero"),
        numpy_helper.from_array(y_scale, "y_scale"),
        numpy_helper.from_array(np.array(0, np.uint8), "y_zero"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["input", "x_scale", "x_zero"], ["input_q"]),
        helper.make_node("DequantizeLinear", ["input_q", "x_scale", "x_zero"], ["input_dq"]),
        helper.make_node("DequantizeLinear", ["w", "w_scale", "w_zero"], ["w_dq"], axis=0),
        helper.make_node("Conv", ["input_dq", "w_dq"], ["conv"]),
        helper.make_node("QuantizeLinear", ["conv", "y_scale", "y_zero"], ["conv_q"]),
        helper.make_node("DequantizeLinear", ["conv_q", "y_scale", "y_zero"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes,
        "one_conv",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [None, channels, 1, 1])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [None, 1, 1, 1])],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


@pytest.mark.parametrize("channels", [60_000, 70_000])
def test_the_check_fails_exactly_where_the_fused_kernel_leaves_the_exact_result(tmp_path, channels):
    path = tmp_path / "one_conv.onnx"
    model = one_conv(channels)
    onnx.save(model, str(path))
    x = np.full((2, channels, 1, 1), PIXEL, np.float32)
    scale = channels * PIXEL * WEIGHT / EXACT_STEPS
    fused_steps = run_session(ort_session(path), x) / scale  # what the integer kernel computes
    off = float(np.abs(fused_steps - EXACT_STEPS).max())
    assert (channels * PIXEL * WEIGHT > INT32_MAX) == (channels == 70_000)  # the oracle: integer arithmetic
    if off > KERNEL_MAX_STEPS:
        with pytest.raises(MaskforgeError, match=r"kernel computing conv_q disagrees .* by \d+ quantization steps"):
            check_kernels(path, x)
    else:
        result = check_kernels(path, x)
        assert result.max_steps <= 1 and result.tensors == 3  # input_q, conv_q and the output
    if channels == 60_000:
        assert off <= 1.0  # within int32: every CPU computes the exact 200


def test_weights_quantized_by_a_constant_subgraph_are_not_cut():
    """Only tensors that depend on the input are activations: a QuantizeLinear of a constant (a weight
    computed in the graph, as regen storage does) is left alone."""
    model = one_conv(4)
    graph = model.graph
    graph.initializer.append(numpy_helper.from_array(np.ones((1, 4, 1, 1), np.float32), "w_float"))
    graph.node.insert(0, helper.make_node("QuantizeLinear", ["w_float", "w_scale", "w_zero"], ["w_made"], axis=0))
    assert activation_quantizers(model) == ["input_q", "conv_q"]

"""The int8 kernel check: onnxruntime's integer kernels against the same QDQ graph run in float, kernel by kernel.

An int8 file runs two ways: optimized (onnxruntime fuses each DequantizeLinear -> op -> QuantizeLinear
group into an integer kernel, e.g. QLinearConv) and unoptimized (every node one by one, the Q/DQ pairs in
float). A fused kernel may round differently from the float run (the float sum of its products is not
the exact integer sum), by one step of its output's quantization; a kernel that overflows or saturates
(tests/test_int8_saturation.py) is off by many steps.

Comparing only the logits cannot tell the two apart in a deep network: a one-step rounding difference
in an early layer travels through every layer after it, and the logits of DenseNet-121 or RegNet-X-400MF
(measured: every kernel within 1 step, on 1 to 3 of 100,000 values) then differ by 9 to 40 steps of the
output scale. So the check compares every quantized activation, each computed from the *same* inputs:
the unoptimized run records every activation QuantizeLinear output; the graph is then cut at those tensors
(each becomes an input of its consumers, fed with the recorded values) and run optimized. Each segment
between two cuts, one fused kernel in practice, then sees exactly the inputs the float run saw, and its
output may differ from the recorded one by rounding only.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from ..errors import MaskforgeError

#: The most a quantized tensor may differ between the integer kernels and the float run, in steps of its
#: own quantization scale, when both start from the same inputs (measured on the zoo and the paper's
#: networks: 1; an int16 pair saturation or an int32 overflow is off by tens to hundreds)
KERNEL_MAX_STEPS = 2
KERNEL_BATCH = 32  # images per run: every recorded activation of a batch is held in memory at once
CUT_SUFFIX = "::maskforge_cut"


@dataclass(frozen=True)
class KernelCheck:
    """How the integer kernels compared with the float run."""

    max_steps: int  # the largest difference of any quantized tensor, in its own quantization steps
    worst_tensor: str  # the tensor where it was seen
    tensors: int  # quantized tensors compared (each activation QuantizeLinear output, and the output)
    float_output: np.ndarray = field(repr=False)  # the graph's output on the images, run unoptimized


def check_kernels(path: str | os.PathLike, images: np.ndarray) -> KernelCheck:
    """Compare every quantized tensor of the int8 file at `path` on `images`; raise `MaskforgeError` when a
    kernel differs from the float run by more than `KERNEL_MAX_STEPS` steps."""
    import onnx

    from .sessions import ort_session

    proto = onnx.load(str(path))
    cuts = activation_quantizers(proto)
    output = proto.graph.output[0].name
    output_scale = _output_scale(proto)
    recording = ort_session(_recording(proto, cuts).SerializeToString(), optimization="none")
    cut = ort_session(_cut(proto, cuts).SerializeToString())
    input_name = recording.get_inputs()[0].name
    worst, worst_name, float_outputs = 0, output, []
    for start in range(0, len(images), KERNEL_BATCH):
        x = images[start : start + KERNEL_BATCH]
        recorded = dict(zip([o.name for o in recording.get_outputs()], recording.run(None, {input_name: x})))
        feeds = {input_name: x, **{name + CUT_SUFFIX: recorded[name] for name in cuts}}
        fused = dict(zip([o.name for o in cut.get_outputs()], cut.run(None, feeds)))
        for name in cuts:
            steps = int(np.abs(fused[name].astype(np.int64) - recorded[name].astype(np.int64)).max(initial=0))
            if steps > worst:
                worst, worst_name = steps, name
        last = float(np.abs(fused[output].astype(np.float64) - recorded[output]).max(initial=0.0))
        steps = int(np.ceil(last / output_scale)) if np.isfinite(last) else np.iinfo(np.int64).max
        if steps > worst:
            worst, worst_name = steps, output
        float_outputs.append(recorded[output])
    if worst > KERNEL_MAX_STEPS:
        raise MaskforgeError(
            f"onnxruntime's int8 kernel computing {worst_name} disagrees with the same operators run in "
            f"float by {worst} quantization steps on the same inputs (at most {KERNEL_MAX_STEPS} allowed: "
            f"rounding); the kernel overflows or saturates on this CPU"
        )
    return KernelCheck(worst, worst_name, len(cuts) + 1, np.concatenate(float_outputs))


def activation_quantizers(proto) -> list[str]:
    """The outputs of the QuantizeLinear nodes whose input depends on the graph's input (activations, not
    weights: a weight may be quantized by a constant subgraph), in graph order."""
    initializers = {tensor.name for tensor in proto.graph.initializer}
    varying = {value.name for value in proto.graph.input if value.name not in initializers}
    found = []
    for node in proto.graph.node:  # ONNX graphs are topologically sorted
        if any(name in varying for name in node.input):
            varying.update(node.output)
            if node.op_type == "QuantizeLinear":
                found.append(node.output[0])
    return found


def _recording(proto, cuts: list[str]):
    """A copy of `proto` that also outputs every tensor in `cuts`."""
    import onnx
    from onnx import helper

    recording = onnx.ModelProto()
    recording.CopyFrom(proto)
    outputs = {value.name for value in recording.graph.output}
    for name in cuts:
        if name not in outputs:
            recording.graph.output.append(helper.make_empty_tensor_value_info(name))
    return recording


def _cut(proto, cuts: list[str]):
    """A copy of `proto` whose nodes read each tensor in `cuts` from a new graph input (named with
    `CUT_SUFFIX`) instead of from the node that computes it; the computed tensors become outputs."""
    import onnx
    from onnx import helper

    types = _quantized_types(proto)
    cut = onnx.ModelProto()
    cut.CopyFrom(proto)
    cut_names = set(cuts)
    for node in cut.graph.node:
        for i, name in enumerate(node.input):
            if name in cut_names:
                node.input[i] = name + CUT_SUFFIX
    outputs = {value.name for value in cut.graph.output}
    for name in cuts:
        cut.graph.input.append(helper.make_tensor_value_info(name + CUT_SUFFIX, types[name], None))
        if name not in outputs:
            cut.graph.output.append(helper.make_empty_tensor_value_info(name))
    return cut


def _quantized_types(proto) -> dict[str, int]:
    """The element type of each QuantizeLinear output: its zero point's (uint8 when it has none)."""
    from onnx import TensorProto

    initializers = {tensor.name: tensor.data_type for tensor in proto.graph.initializer}
    types = {}
    for node in proto.graph.node:
        if node.op_type == "QuantizeLinear":
            zero_point = node.input[2] if len(node.input) > 2 else ""
            types[node.output[0]] = initializers.get(zero_point, TensorProto.UINT8)
    return types


def _output_scale(proto) -> float:
    """The scale of the DequantizeLinear that produces the graph's output (1.0 if the output is float)."""
    from onnx import numpy_helper

    initializers = {tensor.name: tensor for tensor in proto.graph.initializer}
    output = proto.graph.output[0].name
    for node in proto.graph.node:
        if node.op_type == "DequantizeLinear" and node.output[0] == output and node.input[1] in initializers:
            return float(np.max(numpy_helper.to_array(initializers[node.input[1]])))
    return 1.0

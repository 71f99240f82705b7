"""int8 (QDQ) quantization of a traced fp32 graph, with onnxruntime's own quantization tooling.

Why it is exact for maskforge's weights: after batch-norm folding, output channel j of a signed- (or
unsigned-) constant layer is `c_j x {-1, 0, +1}`. Per-channel symmetric int8 with scale `c_j` stores
those weights *exactly* as -1/0/+1. The one thing onnxruntime's `quantize_static` does not choose by
itself is that scale (it would pick max|w|/127, i.e. store +-127): we hand it `c_j` per channel through
its `TensorQuantOverrides` option, and it does everything else (calibrating the activations, inserting
Q/DQ pairs, requantizing each bias to int32 at scale `x_scale x c_j`).

Storing +-127 instead would be worse than wasteful: onnxruntime's u8 x s8 kernels on x86 CPUs without
VNNI add pairs of products in int16 (`vpmaddubsw`), and 2 x 255 x 127 = 64,770 saturates at 32,767.
With -1/0/+1 a pair sums to at most 510 and nothing can saturate (tests/test_int8_saturation.py).

Weights of other distributions (kaiming_normal) are not `c_j x {-1, 0, +1}`; quantizing them is lossy
and happens only when asked (`allow_lossy`), with 7-bit weights (`reduce_range`) so that the same
kernels cannot saturate, and is still gated by the held-out accuracy check.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import MaskforgeError, first_line
from ..fileio import NO_ROOM, NO_ROOM_WHY, atomic_write, reported_errno
from .calibration import calibration_reader
from .onnxio import per_channel_magnitude, weight_refs
from .trace import INPUT_NAME


@dataclass
class QuantizeInfo:
    """What quantization did: the weights it made exact (or not) and how it calibrated."""

    exact_weights: bool  # every weight is -1/0/+1 times its per-channel scale
    weight_max_error: float  # max |dequantized int8 - fp32| over all weights (0.0 when exact)
    calibration_images: int


def quantize(proto_fp32, calibration: np.ndarray, *, lossy: bool):
    """A QDQ int8 `onnx.ModelProto` of `proto_fp32` (uint8 activations, per-channel int8 weights)."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    overrides = {} if lossy else exact_scales(proto_fp32)
    options = {
        "TensorQuantOverrides": overrides,
        # keep c_j even when a bias is large: changing the scale would break -1/0/+1
        "QDQDisableWeightAdjustForInt32Bias": not lossy,
    }
    # a graph with float-only operators (a transformer): quantize only the weight operators after the first
    only = weight_nodes(proto_fp32)[1:] if float_nodes(proto_fp32) else None
    with tempfile.TemporaryDirectory(prefix="maskforge-int8-") as tmp, _quiet_quantizer():
        source, out = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        try:
            atomic_write(source, proto_fp32.SerializeToString())  # a path: given a proto, the quantizer edits it
            quantize_static(
                source,
                out,
                calibration_reader(calibration, INPUT_NAME),
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                reduce_range=lossy,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                calibrate_method=CalibrationMethod.MinMax,
                extra_options=options,
                nodes_to_quantize=only,
            )
            return onnx.load(str(out))
        except Exception as exc:  # noqa: BLE001 - the quantizer raises ValueError/RuntimeError and others
            code = reported_errno(exc)  # also through atomic_write's MaskforgeError (its context is the OSError)
            if code in NO_ROOM:  # its working copies are internal: say where the room is missing, not their names
                raise ScratchFull(
                    f"no room for the int8 quantizer's working files in the temporary folder "
                    f"{Path(tmp).parent} ({NO_ROOM_WHY[code]}); set TMPDIR to a folder with room "
                    f"(a few times the model's size)"
                ) from None
            if isinstance(exc, MaskforgeError):
                raise
            raise MaskforgeError(f"onnxruntime's quantizer failed: {first_line(exc)}") from None


class ScratchFull(MaskforgeError):
    """The temporary folder has no room for the quantizer's working files (the caller names its output)."""


#: Operators that mark a graph whose int8 export quantizes only the weight operators (Conv, Gemm, MatMul
#: with a weight) and leaves the rest in float32: attention's softmax, the norms of a transformer and its
#: residual sums span ranges a per-tensor uint8 scale cannot hold (a converted ViT kept the fp32 class
#: for 68 % of images with everything quantized, for over 98 % with the weight operators only). Sigmoid
#: (SiLU, squeeze-excitation) is not among them: EfficientNet-B0 quantized whole keeps the fp32 class for
#: 99.4 % of held-out images (99.6 % weight operators only) and runs 1.25x faster than fp32 where the
#: weight operators alone gave 0.98x (1 thread, batch 8 at 32x32, BENCHMARKS.md §11). (It was listed while the
#: kernel check compared only the logits, where a deep network's one-step roundings add up.)
#:
#: On that path the first weight operator, the one that reads the image, stays float32 too. A per-tensor
#: uint8 grid cannot hold normalized pixels: with scale = one pixel step, the zero point 255 x mean (33.3
#: for the demo digits) is rounded, which moves every pixel of every image by the same third of a step.
#: That shift alone made a 69 %-accurate user model keep its fp32 class for only 96.7 % of 1,000 held-out
#: images; the first operator in float raised the small ViT from 97.6 % to 98.6 % agreement and that user
#: model from 87 % to 95 % (AMD EPYC with AVX-512 VNNI). It is a small share of the work (a ViT's patch
#: projection). Graphs without float-only operators, the paper's networks among them, are
#: quantized whole, as before: there the full-integer path is the point, and a RegNet gained nothing.
FLOAT_OPS = ("Softmax", "LayerNormalization", "GroupNormalization", "InstanceNormalization")


def float_nodes(proto) -> list[str]:
    """`FLOAT_OPS` nodes and every MatMul of two activations (attention's q k^T and its weighted sum)."""
    initializers = {tensor.name for tensor in proto.graph.initializer}
    return [
        node.name
        for node in proto.graph.node
        if node.op_type in FLOAT_OPS
        or (node.op_type == "MatMul" and not any(name in initializers for name in node.input))
    ]


def weight_nodes(proto) -> list[str]:
    """The Conv/Gemm/MatMul nodes whose input 1 is a weight initializer."""
    initializers = {tensor.name for tensor in proto.graph.initializer}
    return [
        node.name
        for node in proto.graph.node
        if node.op_type in ("Conv", "Gemm", "MatMul") and len(node.input) > 1 and node.input[1] in initializers
    ]


def exact_scales(proto) -> dict[str, list[dict]]:
    """TensorQuantOverrides giving each weight the scale c_j of its output channel, so int8 = -1/0/+1."""
    from onnx import numpy_helper

    initializers = {tensor.name: tensor for tensor in proto.graph.initializer}
    overrides = {}
    for ref in weight_refs(proto):
        weight = numpy_helper.to_array(initializers[ref.name])
        channels = np.moveaxis(weight, ref.channel_axis, 0)
        mask = channels != 0
        magnitude = per_channel_magnitude(channels, mask)
        per_row = (len(channels),) + (1,) * (channels.ndim - 1)
        if magnitude is None or (magnitude.ndim and magnitude.shape != per_row):
            raise MaskforgeError(
                f"weight {ref.name} is not one magnitude per output channel, so int8 cannot store "
                f"it exactly (this is a maskforge bug for constant distributions)"
            )
        scales = np.broadcast_to(magnitude.reshape(-1), (len(channels),))
        # an all-zero channel: any positive scale stores it exactly
        overrides[ref.name] = [
            {"axis": ref.channel_axis, "scale": np.float32(s if s > 0 else 1.0), "zero_point": np.int8(0)}
            for s in scales
        ]
    return overrides


def check_int8_weights(proto_int8, proto_fp32, *, exact: bool, calibration_images: int) -> QuantizeInfo:
    """Compare every dequantized int8 weight with the fp32 weight it replaced.

    For constant distributions (`exact`) each must be -1/0/+1 and dequantize to the fp32 value bit for
    bit, or the export stops: the file would not compute the artifact's network.
    """
    from onnx import numpy_helper

    fp32 = {t.name: numpy_helper.to_array(t) for t in proto_fp32.graph.initializer}
    error = 0.0
    for name, quantized, dequantized in dequantized_weights(proto_int8):
        original = fp32.get(name[: -len("_quantized")] if name.endswith("_quantized") else name)
        if original is None or original.shape != dequantized.shape:
            raise MaskforgeError(f"int8 weight {name} has no fp32 counterpart; this is a maskforge bug")
        error = max(error, float(np.abs(dequantized.astype(np.float64) - original).max()))
        if exact and (np.abs(quantized).max() > 1 or not np.array_equal(dequantized, original)):
            raise MaskforgeError(
                f"int8 weight {name} does not reproduce the fp32 weight exactly (values "
                f"{sorted(set(np.unique(quantized).tolist()))[:5]}); this is a maskforge bug"
            )
    return QuantizeInfo(exact, error, calibration_images)


def dequantized_weights(proto):
    """(name, int8 array, float32 dequantized array) for each weight DequantizeLinear of a QDQ graph."""
    from onnx import numpy_helper

    initializers = {tensor.name: tensor for tensor in proto.graph.initializer}
    by_output = {node.input[0]: node for node in proto.graph.node if node.op_type == "DequantizeLinear"}
    for ref in weight_refs(proto):
        node = by_output.get(ref.name)
        if node is None:
            continue
        quantized = numpy_helper.to_array(initializers[ref.name])
        scale = numpy_helper.to_array(initializers[node.input[1]]).astype(np.float32)
        zero = numpy_helper.to_array(initializers[node.input[2]]).astype(np.int32) if len(node.input) > 2 else 0
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        shape = [1] * quantized.ndim
        if np.ndim(scale) == 1:
            shape[axis] = -1
        values = (quantized.astype(np.int32) - np.reshape(zero, shape if np.ndim(zero) else [])).astype(np.float32)
        yield ref.name, quantized, values * np.reshape(scale, shape if np.ndim(scale) else [])


def folded_weights(path: str | os.PathLike) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """`dequantized_weights` of an int8 file as onnxruntime runs it: compact and regen weight subgraphs
    constant-folded into initializers first (basic optimization keeps the DequantizeLinear nodes)."""
    import onnx

    from .sessions import ort_session

    with tempfile.TemporaryDirectory(prefix="maskforge-folded-") as tmp:
        folded = Path(tmp) / "folded.onnx"
        ort_session(path, optimization="basic", optimized_path=folded)
        return list(dequantized_weights(onnx.load(str(folded))))


@contextlib.contextmanager
def _quiet_quantizer():
    """The quantizer logs advice (pre-processing, opsets) through the root logger; keep the CLI clean."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)

"""The compact encoding: each weight stored as packed mask bits plus sign bits (or values) of the kept
weights, rebuilt by standard ONNX operators that onnxruntime constant-folds at session start.

Works for float32 weights (fp32 exports) and for the int8 weights of a QDQ export (there the magnitude
is the int8 `1` and the per-channel scale lives in the DequantizeLinear). docs/DEPLOY.md specifies the
encoding bit by bit; every operator is in the default domain at opset <= 13.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..errors import MaskforgeError
from .onnxio import ZERO_NAMES, Subgraph, packed_bits, per_channel_magnitude, replace_weights, weight_refs, zero_tensors

_SHIFTS, _TWO, _ONE_I32, _AXIS0, _FLAT, _START = (
    "maskforge/bit_shifts",
    "maskforge/two_u8",
    "maskforge/one_i32",
    "maskforge/axis0",
    "maskforge/flat_shape",
    "maskforge/start",
)


@dataclass
class EncodeStats:
    """What an encoding replaced: weight tensors, their elements and nonzero elements, per encoding."""

    weights: int = 0
    elements: int = 0
    kept: int = 0
    encodings: dict = field(default_factory=dict)

    def add(self, weight: np.ndarray, encoding: str) -> None:
        self.weights += 1
        self.elements += weight.size
        self.kept += int(np.count_nonzero(weight))
        self.encodings[encoding] = self.encodings.get(encoding, 0) + 1

    def expect(self, total: int | None, kept: int | None, storage: str) -> "EncodeStats":
        if total is not None and (self.elements != total or (kept is not None and self.kept != kept)):
            raise MaskforgeError(
                f"{storage} export found {self.elements:,} weights ({self.kept:,} nonzero) in the "
                f"traced graph, the artifact has {total:,} ({kept:,} kept); this is a maskforge "
                f"bug, use storage 'dense'"
            )
        return self


def compact_weights(proto, *, expect_total: int | None = None, expect_kept: int | None = None) -> EncodeStats:
    """Replace (in place) every weight initializer of Conv/Gemm/MatMul (or of the DequantizeLinear
    feeding one) by its packed encoding; the expansion nodes go first in the graph."""
    from onnx import numpy_helper

    initializers = {tensor.name: tensor for tensor in proto.graph.initializer}
    stats, nodes, tensors, replaced = EncodeStats(), [], [], set()
    for ref in weight_refs(proto):
        weight = numpy_helper.to_array(initializers[ref.name])
        encoded = _encode_weight(ref.name, weight, len(replaced))
        if encoded is None:
            continue  # an all-zero weight: nothing to gain, keep it dense
        sub, encoding = encoded
        replaced.add(ref.name)
        nodes += sub.nodes
        tensors += sub.tensors
        stats.add(weight, encoding)
    used = {name for node in nodes for name in node.input}
    replace_weights(proto, replaced, nodes, [t for t in _shared_constants() if t.name in used] + tensors)
    return stats.expect(expect_total, expect_kept, "compact")


def _shared_constants():
    from onnx import numpy_helper

    yield numpy_helper.from_array(np.arange(8, dtype=np.uint8), _SHIFTS)
    yield numpy_helper.from_array(np.array(2, dtype=np.uint8), _TWO)
    yield numpy_helper.from_array(np.array(1, dtype=np.int32), _ONE_I32)
    yield numpy_helper.from_array(np.array(0, dtype=np.int32), _AXIS0)
    yield numpy_helper.from_array(np.array([-1], dtype=np.int64), _FLAT)
    yield numpy_helper.from_array(np.array([0], dtype=np.int64), _START)
    yield from zero_tensors()


def _encode_weight(name: str, weight: np.ndarray, index: int) -> tuple[Subgraph, str] | None:
    """A subgraph that rebuilds `weight` exactly under the name `name` and its encoding, or None."""
    from onnx import TensorProto

    flat = weight.reshape(-1)
    mask = flat != 0
    count, kept = flat.size, int(mask.sum())
    if kept == 0:
        return None
    sub = Subgraph(f"{name}/maskforge")  # initializers: named after the weight they rebuild
    q = f"_mf{index}"  # intermediate values: short names (they are stored once per use)

    def unpack(bits_name: str, length: int, tag: str) -> str:
        # bytes [B, 1] >> [0..7] -> [B, 8]; mod 2 -> bit j of byte b at position 8b + j (LSB first)
        shifted = sub.node("BitShift", [bits_name, _SHIFTS], f"{q}/{tag}_shifted", direction="RIGHT")
        bits = sub.node("Mod", [shifted, _TWO], f"{q}/{tag}_bits")
        flat_bits = sub.node("Reshape", [bits, _FLAT], f"{q}/{tag}_flat")
        if length % 8:
            cut = sub.init(f"{tag}_count", np.array([length], dtype=np.int64))
            flat_bits = sub.node("Slice", [flat_bits, _START, cut], f"{q}/{tag}_cut")
        return sub.node("Cast", [flat_bits], f"{q}/{tag}", to=TensorProto.BOOL)

    def packed(values: np.ndarray) -> np.ndarray:
        return packed_bits(values).reshape(-1, 1)

    def kept_index() -> str:
        # index of each weight among the kept ones: inclusive prefix count of the mask, minus one
        as_int = sub.node("Cast", [mask_flat], f"{q}/mask_i32", to=TensorProto.INT32)
        prefix = sub.node("CumSum", [as_int, _AXIS0], f"{q}/prefix")
        return sub.node("Sub", [prefix, _ONE_I32], f"{q}/kept_index")

    zero = ZERO_NAMES.get(weight.dtype)
    if zero is None:  # pragma: no cover - weight_refs yields float32/int8/uint8 only
        raise MaskforgeError(f"cannot encode weight {name} of type {weight.dtype}")
    shape = sub.init("shape", np.array(weight.shape, dtype=np.int64))
    mask_flat = unpack(sub.init("mask_packed", packed(mask)), count, "mask")
    magnitude = per_channel_magnitude(weight, mask.reshape(weight.shape))
    kept_values = flat[mask]
    mask_shaped = sub.node("Reshape", [mask_flat, shape], f"{q}/mask_shaped")
    if magnitude is not None and bool(np.all(kept_values > 0)):
        encoding = "magnitude"  # all kept weights positive (unsigned constant)
        sub.node("Where", [mask_shaped, sub.init("magnitude", magnitude), zero], name)
    elif magnitude is not None and weight.dtype != np.uint8:
        encoding = "sign"  # signed constant: one sign bit per kept weight
        signs = unpack(sub.init("sign_packed", packed(kept_values > 0)), kept, "sign")
        spread = sub.node("Gather", [signs, kept_index()], f"{q}/sign_all", axis=0)
        spread = sub.node("Reshape", [spread, shape], f"{q}/sign_shaped")
        positive = sub.init("magnitude", magnitude)
        negative = sub.node("Neg", [positive], f"{q}/negative")
        signed = sub.node("Where", [spread, positive, negative], f"{q}/signed")
        sub.node("Where", [mask_shaped, signed, zero], name)
    else:
        encoding = "values"  # any other distribution: the kept values in C order
        values = sub.init("values", kept_values)
        spread = sub.node("Gather", [values, kept_index()], f"{q}/values_all", axis=0)
        spread = sub.node("Reshape", [spread, shape], f"{q}/values_shaped")
        sub.node("Where", [mask_shaped, spread, zero], name)
    return sub, encoding

"""The regen encoding: the ONNX graph regenerates each weight from its stream key at session start.

The generator of docs/FORMAT.md section 1 is SplitMix64 over a 64-bit per-layer key: plain uint64
arithmetic, which standard ONNX operators compute bit-exactly (Range, Cast, Mul, Add, BitShift,
BitwiseXor, BitwiseAnd; the bitwise ones need opset 18). All inputs are initializers, so onnxruntime
constant-folds the generator when the session starts and then runs the same graph as the dense file.

Per weight the file stores only: the packed mask (the artifact's own bytes, PyTorch layout), the
64-bit stream key (computed here in Python: SHA-256 is not an ONNX operator), the shape and the
per-output-channel magnitudes (sigma x the folded batch-norm scale, or the int8 `1` of a QDQ export,
whose scales live in its DequantizeLinear). The generator is defined once, as the model-local ONNX
functions `maskforge.signed_weight` and `maskforge.masked_weight`; each weight is one call (plus a
Transpose for the `[in, out]` weights of MatMul). Runtimes without model-local functions can use
`onnx.inliner.inline_local_functions(model)`.

Only distributions that are plain integer arithmetic qualify: `signed_constant` (a sign bit per weight
from the stream) and `unsigned_constant` (no stream at all). `kaiming_normal` needs the float64
inverse-normal approximation of FORMAT.md section 1.5 and a bit-level log; it is refused.
"""

from __future__ import annotations

import numpy as np

from .. import regen
from ..artifact import Artifact
from ..errors import MaskforgeError
from .compact import EncodeStats
from .onnxio import ZERO_NAMES, Subgraph, packed_bits, per_channel_magnitude, replace_weights, weight_refs
from .onnxio import zero_tensors

DOMAIN = "maskforge"
DOMAIN_VERSION = 1
MIN_OPSET = 18
DISTRIBUTIONS = ("signed_constant", "unsigned_constant")
SIGNED, MASKED = "signed_weight", "masked_weight"
_GAMMA, _MIX1, _MIX2 = regen.SPLITMIX64_GAMMA, regen.SPLITMIX64_MIX1, regen.SPLITMIX64_MIX2


def regen_weights(proto, artifact: Artifact, opset: int) -> EncodeStats:
    """Replace (in place) every weight of the traced (fp32 or QDQ int8) graph by a generator call."""
    from onnx import numpy_helper

    if artifact.init not in DISTRIBUTIONS:
        raise MaskforgeError(refusal(artifact.init))
    initializers = {tensor.name: tensor for tensor in proto.graph.initializer}
    layers = _LayerFinder(artifact)
    stats, nodes, tensors, replaced, kinds = EncodeStats(), [], [], set(), set()
    for ref in weight_refs(proto):
        stored = numpy_helper.to_array(initializers[ref.name])
        weight = stored.T if ref.transposed else stored  # PyTorch layout: [out, in, ...]
        param, positive = layers.find(ref.name, weight)
        sub, kind = _weight_call(ref.name, param, weight, positive, artifact, ref.transposed)
        kinds.add(kind)
        replaced.add(ref.name)
        nodes += sub.nodes
        tensors += sub.tensors
        stats.add(stored, "regen")
    used = {name for node in nodes for name in node.input}
    replace_weights(proto, replaced, nodes, [t for t in zero_tensors() if t.name in used] + tensors)
    proto.functions.extend(generator_function(kind, opset) for kind in sorted(kinds))
    if kinds and not any(o.domain == DOMAIN for o in proto.opset_import):
        entry = proto.opset_import.add()
        entry.domain, entry.version = DOMAIN, DOMAIN_VERSION
    return stats.expect(artifact.masked_weights, artifact.kept_weights, "regen")


def refusal(distribution: str) -> str:
    return (
        f"storage 'regen' cannot rebuild {distribution} weights exactly with ONNX operators (it can "
        f"signed_constant and unsigned_constant); use --storage compact or dense"
    )


class _LayerFinder:
    """Which artifact layer a traced weight is: same shape, same mask and (signed) the same signs.

    The exporter renames weights when it folds batch norm, so names cannot be trusted; the masks and
    sign patterns identify each layer, and checking them proves the traced weight is the artifact's.
    """

    def __init__(self, artifact: Artifact) -> None:
        self.artifact = artifact
        self.unused = list(artifact.masks)

    def find(self, name: str, weight: np.ndarray) -> tuple[str, np.ndarray | None]:
        mask = weight != 0
        for param in self.unused:
            expected = self.artifact.masks[param].numpy()
            if expected.shape != weight.shape or not np.array_equal(expected, mask):
                continue
            positive = None
            if self.artifact.init == "signed_constant":
                positive = self._signs(param, weight.shape)
                if not np.array_equal(positive[mask], weight[mask] > 0):
                    continue
            self.unused.remove(param)
            return param, positive
        raise MaskforgeError(
            f"traced weight {name} {list(weight.shape)} matches no layer of the artifact (mask "
            f"and signs); this is a maskforge bug, use --storage compact"
        )

    def _signs(self, param: str, shape: tuple) -> np.ndarray:
        a = self.artifact
        return regen.generate(a.seed, param, shape, a.init, k=a.k, scale_fan=a.scale_fan) > 0


def _weight_call(
    name: str, param: str, weight: np.ndarray, positive: np.ndarray | None, artifact: Artifact, transposed: bool
) -> tuple[Subgraph, str]:
    """One generator call that rebuilds `weight` (PyTorch layout), checked here to be bit-exact."""
    mask = weight != 0
    magnitude = per_channel_magnitude(weight, mask)
    if magnitude is None or (positive is None and not np.all(weight[mask] > 0)):
        raise MaskforgeError(
            f"weight {name} (layer {param}) is not one magnitude per output channel; "
            f"this is a maskforge bug, use --storage compact"
        )
    zero = np.zeros((), weight.dtype)
    signed = magnitude if positive is None else np.where(positive, magnitude, -magnitude)
    rebuilt = np.where(mask, signed, zero).astype(weight.dtype)
    if rebuilt.tobytes() != np.ascontiguousarray(weight).tobytes():  # bit for bit, +0.0 included
        raise MaskforgeError(
            f"regenerated weight {name} (layer {param}) differs from the traced one; this is a "
            f"maskforge bug, use --storage compact"
        )
    sub = Subgraph(f"{name}/maskforge")
    kind = MASKED if positive is None else SIGNED
    inputs = [
        sub.init("mask_packed", packed_bits(mask)),
        sub.init("shape", np.array(weight.shape, np.int64)),
        sub.init("magnitude", magnitude),
        ZERO_NAMES[weight.dtype],
    ]
    if kind == SIGNED:
        key = regen.stream_key(artifact.seed, param)
        inputs.insert(0, sub.init("key", np.array(key, dtype=np.uint64)))
    output = f"{name}/maskforge/pytorch_layout" if transposed else name
    sub.node(kind, inputs, output, domain=DOMAIN)
    if transposed:
        sub.node("Transpose", [output], name, perm=[1, 0])
    return sub, kind


def generator_function(kind: str, opset: int):
    """The FunctionProto `maskforge.<kind>`: (key,) mask_packed, shape, magnitude, zero -> weight."""
    from onnx import TensorProto, helper, numpy_helper

    body: list = []

    def const(name: str, value) -> str:
        body.append(helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.asarray(value), name)))
        return name

    def op(kind_: str, inputs: list[str], output: str, **attrs) -> str:
        body.append(helper.make_node(kind_, inputs, [output], **attrs))
        return output

    def split(words: str, width: int, step: int, dtype, tag: str) -> str:
        """[w] words -> [w * width / step] pieces of `step` bits each, least significant first, still `dtype`."""
        column = op("Unsqueeze", [words, const(f"{tag}_axis", np.array([1], np.int64))], f"{tag}_column")
        shifts = const(f"{tag}_shifts", np.arange(0, width, step, dtype=dtype))
        shifted = op("BitShift", [column, shifts], f"{tag}_shifted", direction="RIGHT")
        low = op("BitwiseAnd", [shifted, const(f"{tag}_low", np.array((1 << step) - 1, dtype))], f"{tag}_low_bits")
        return op("Reshape", [low, const(f"{tag}_flat", np.array([-1], np.int64))], f"{tag}_flat_bits")

    def bits(packed: str, count: str, tag: str) -> str:
        """Bit i of the result is bit (i mod 8), LSB first, of byte (i div 8) of `packed`: bool, `shape`."""
        cut = op(
            "Slice",
            [split(packed, 8, 1, np.uint8, tag), const(f"{tag}_start", np.array([0], np.int64)), count],
            f"{tag}_cut",
        )
        return op("Reshape", [op("Cast", [cut], f"{tag}_bool", to=TensorProto.BOOL), "shape"], f"{tag}_shaped")

    count = op("ReduceProd", ["shape"], "count", keepdims=1)  # n, as int64 [1]
    mask = bits("mask_packed", count, "mask")
    if kind == SIGNED:
        # block j = SplitMix64 output j + 1 from state `key`; weight i uses bit (i mod 64) of block (i div 64)
        one = const("one", np.array(1, np.int64))
        n = op("Squeeze", [count], "n")
        blocks = op(
            "Div",
            [op("Add", [n, const("c63", np.array(63, np.int64))], "n63"), const("c64", np.array(64, np.int64))],
            "blocks",
        )
        j = op("Cast", [op("Range", [one, op("Add", [blocks, one], "stop"), one], "j_i64")], "j", to=TensorProto.UINT64)
        z = op("Add", [op("Mul", [j, const("gamma", np.array(_GAMMA, np.uint64))], "jg"), "key"], "z0")
        for step, (shift, mix) in enumerate(((30, _MIX1), (27, _MIX2), (31, None))):
            shifted = op(
                "BitShift", [z, const(f"s{shift}", np.array(shift, np.uint64))], f"z{step}_shr", direction="RIGHT"
            )
            z = op("BitwiseXor", [z, shifted], f"z{step}_xor")
            if mix is not None:
                z = op("Mul", [z, const(f"mix{step}", np.array(mix, np.uint64))], f"z{step + 1}")
        # the blocks' bytes, little-endian, as uint8: the per-weight intermediates then take 1 byte, not 8
        block_bytes = op("Cast", [split(z, 64, 8, np.uint64, "bytes")], "block_bytes", to=TensorProto.UINT8)
        sign = bits(block_bytes, count, "sign")
        value = op("Where", [sign, "magnitude", op("Neg", ["magnitude"], "negative")], "signed")
        inputs = ["key", "mask_packed", "shape", "magnitude", "zero"]
    else:
        value, inputs = "magnitude", ["mask_packed", "shape", "magnitude", "zero"]
    op("Where", [mask, value, "zero"], "weight")
    return helper.make_function(DOMAIN, kind, inputs, ["weight"], body, opset_imports=[helper.make_opsetid("", opset)])

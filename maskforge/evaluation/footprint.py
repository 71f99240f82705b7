"""Sizes (file bytes, bits per masked weight) and compute (parameters, MACs) of an evaluated model.

Counts come from the maskforge metadata (or the artifact) when present; for a foreign dense ONNX file
they are counted from its Conv/Gemm/MatMul weight initializers. MACs come from ONNX shape inference.
"""

from __future__ import annotations

import math

import numpy as np

from ..sizes import bits_per_weight
from .report import Compute, Size
from .subject import WEIGHT_OPS, Subject, all_weights_constant, graph_dims


def size_section(subject: Subject, artifact_subject: Subject | None = None) -> Size:
    """`artifact_subject`: the artifact an exported file came from (for `compare` and artifact eval)."""
    source = artifact_subject or subject
    artifact, info = source.artifact, subject.info
    masked, _ = weight_counts(subject, source)
    bn_values = sum(s.numel() for s in artifact.bn_stats.values()) if artifact else info.get_int("bn_values")
    artifact_bytes = artifact.file_bytes if artifact else info.get_int("artifact_bytes")
    onnx_bytes = subject.onnx_path.stat().st_size
    return Size(
        onnx_bytes=onnx_bytes,
        masked_weights=masked,
        onnx_bits_per_weight=bits_per_weight(onnx_bytes, masked) if masked else None,
        artifact_bytes=artifact_bytes,
        artifact_bits_per_weight=bits_per_weight(artifact_bytes, masked) if artifact_bytes and masked else None,
        dense_float32_bytes=4 * (masked + (bn_values or 0)) if masked else None,
    )


def weight_counts(subject: Subject, source: Subject) -> tuple[int | None, int | None]:
    """(masked weights, kept weights): from the artifact or metadata, else from dense initializers."""
    if source.artifact is not None:
        return source.artifact.masked_weights, source.artifact.kept_weights
    total, kept = subject.info.get_int("masked_weights"), subject.info.get_int("kept_weights")
    if total is None and all_weights_constant(subject.proto):
        from onnx import numpy_helper

        arrays = [numpy_helper.to_array(t) for t in _weight_initializers(subject.proto)]
        total, kept = sum(a.size for a in arrays), sum(int(np.count_nonzero(a)) for a in arrays)
    return total, kept


def compute_section(subject: Subject, artifact_subject: Subject | None = None) -> Compute:
    total, kept = weight_counts(subject, artifact_subject or subject)
    macs = macs_per_example(subject.proto)
    density = kept / total if total and kept is not None else None
    return Compute(
        params_total=total,
        params_kept=kept,
        density=density,
        macs_dense=macs,
        macs_effective=int(round(macs * density)) if macs is not None and density is not None else None,
    )


def _weight_initializers(proto) -> list:
    initializers = {t.name: t for t in proto.graph.initializer}
    names: list[str] = []
    for node in proto.graph.node:
        if node.op_type in WEIGHT_OPS and len(node.input) > 1 and node.input[1] in initializers:
            if node.input[1] not in names:
                names.append(node.input[1])
    return [initializers[name] for name in names]


def macs_per_example(proto) -> int | None:
    """Multiply-accumulates per example of Conv/Gemm/MatMul, from ONNX shape inference (None if unknown)."""
    import onnx

    try:
        inferred = onnx.shape_inference.infer_shapes(proto)
    except Exception:  # noqa: BLE001 - shape inference is best effort
        return None
    shapes = {t.name: list(t.dims) for t in proto.graph.initializer}
    for value in list(inferred.graph.value_info) + list(inferred.graph.output) + list(inferred.graph.input):
        shapes.setdefault(value.name, graph_dims(value))
    total = 0
    for node in proto.graph.node:
        if node.op_type not in WEIGHT_OPS or len(node.input) < 2:
            continue
        weight, output = shapes.get(node.input[1]), shapes.get(node.output[0])
        if not weight or not output or not all(isinstance(d, int) for d in weight + output[1:]):
            return None
        if node.op_type == "Conv":
            total += math.prod(output[1:]) * math.prod(weight[1:])
        else:
            trans_b = any(a.name == "transB" and a.i for a in node.attribute)
            reduce = weight[-1] if node.op_type == "Gemm" and trans_b else weight[-2]
            total += math.prod(output[1:]) * reduce
    return total

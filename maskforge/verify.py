"""Integrity checks: is this artifact (or this ONNX export of it) exactly what was searched?

`verify_artifact` runs every check that loading runs (safetensors layout, schema and version, the
document and tensor digests, the structure against the architecture, the masks), then regenerates every
weight tensor and compares it with the digest recorded at search time. `verify_onnx` checks that an
ONNX file was exported from a given artifact (its maskforge metadata names the artifact's digest, arch,
k and seed) and that onnxruntime computes the same outputs as the materialized artifact. Both return a
`VerifyReport` listing each check; the first failure names the layer, tensor or field at fault.

Digests detect corruption and accidental edits, not forgery: someone who rewrites the document can
recompute its digest. To check authenticity, compare the artifact digest (`report.digest`) with one
published by a source you trust.

`check_onnx_external_data` refuses ONNX files whose external-data locations point outside the model's
folder; call it before handing an untrusted ONNX path to `onnx.load` or onnxruntime.

>>> report = verify_artifact("runs/demo/artifact.safetensors")    # doctest: +SKIP
>>> report.ok, [check.name for check in report.checks][:3]        # doctest: +SKIP
(True, ['file', 'header', 'schema'])
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .artifact import Artifact, artifact_from_bytes, check_weight_digests, regenerate_weights
from .errors import MaskforgeError
from .fileio import read_bytes


@dataclass
class Check:
    """One verification step: its name, whether it passed, and what it found."""

    name: str
    ok: bool
    detail: str

    def to_dict(self) -> dict:
        return {"name": self.name, "ok": self.ok, "detail": self.detail}


@dataclass
class VerifyReport:
    """The outcome of `verify_artifact` / `verify_onnx`: every check run, in order."""

    path: Path
    kind: str  # "artifact" | "onnx"
    checks: list[Check] = field(default_factory=list)
    digest: str | None = None  # the artifact's digest, when it could be read

    @property
    def ok(self) -> bool:
        return all(check.ok for check in self.checks) and bool(self.checks)

    @property
    def failure(self) -> Check | None:
        """The first failed check (None when everything passed)."""
        return next((check for check in self.checks if not check.ok), None)

    def raise_for_failure(self) -> "VerifyReport":
        """Raise `MaskforgeError` with the first failure's message; return self when all passed."""
        failure = self.failure
        if failure is not None:
            raise MaskforgeError(f"verification of {self.path} failed at {failure.name}: {failure.detail}")
        return self

    def to_dict(self) -> dict:
        return {
            "path": str(self.path),
            "kind": self.kind,
            "ok": self.ok,
            "digest": self.digest,
            "checks": [check.to_dict() for check in self.checks],
        }

    def _pass(self, name: str, detail: str) -> None:
        self.checks.append(Check(name, True, detail))

    def _fail(self, name: str, detail: str) -> "VerifyReport":
        self.checks.append(Check(name, False, _strip_label(detail, self.path)))
        return self


# --- artifacts -----------------------------------------------------------------------------------------

_LOAD_STAGES = ("header", "schema", "document digest", "tensor digests", "structure", "masks")


def verify_artifact(path: str | os.PathLike, *, threads: int | None = None) -> VerifyReport:
    """Check every byte of an artifact and every regenerated weight; never raises for a bad file.

    >>> verify_artifact("runs/demo/artifact.safetensors").ok       # doctest: +SKIP
    True
    """
    return _verify_artifact(Path(path), threads)[0]


def _verify_artifact(path: Path, threads: int | None) -> tuple[VerifyReport, Artifact | None]:
    report = VerifyReport(path, "artifact")
    try:
        data = read_bytes(path, "artifact")
    except MaskforgeError as exc:
        return report._fail("file", str(exc)), None
    report._pass("file", f"{len(data):,} bytes")
    artifact, failure = _load_with_report(data, path, report)
    if artifact is None:
        return report._fail(failure[0], failure[1]), None
    report.digest = artifact.digest
    _check_weights(artifact, report, threads)
    return report, artifact


def _load_with_report(data: bytes, path: Path, report: VerifyReport) -> tuple[Artifact | None, tuple[str, str] | None]:
    """Run the loader stage by stage; on failure return the stage that failed and its message."""
    passed: list[str] = []

    def on_check(stage: str, detail: str) -> None:
        passed.append(stage)
        report._pass(stage, detail)

    try:
        artifact = artifact_from_bytes(data, str(path), on_check=on_check)
    except MaskforgeError as exc:
        stage = next((s for s in _LOAD_STAGES if s not in passed), "load")
        return None, (stage, str(exc))
    artifact.path, artifact.file_bytes = path, len(data)
    return artifact, None


def _check_weights(artifact: Artifact, report: VerifyReport, threads: int | None) -> None:
    """Regenerate each layer from the seed and compare its SHA-256 with the recorded one."""
    generated = regenerate_weights(artifact, digests=True, keep=False, threads=threads)
    try:
        check_weight_digests(artifact, {param: digest for param, (_, digest) in generated.items()})
    except MaskforgeError as exc:
        report._fail("weights", str(exc))
        return
    report._pass(
        "weights",
        f"{len(generated)} layers ({artifact.masked_weights:,} weights) regenerated from seed "
        f"{artifact.seed} match their sha256",
    )


# --- ONNX exports ----------------------------------------------------------------------------------------


def verify_onnx(
    onnx_path: str | os.PathLike, artifact_path: str | os.PathLike, *, rtol: float | None = None
) -> VerifyReport:
    """Check that an ONNX file is an export of `artifact_path` and computes what the artifact does.

    Checks, in order: the artifact itself (all of `verify_artifact`), the ONNX file's external-data
    locations, that it parses, that its maskforge metadata names the artifact's digest, arch, arch args,
    k, seed and init, and its outputs. fp32 files (any storage): onnxruntime's logits equal the
    materialized artifact's on a fixed batch (max abs difference <= `rtol` x the largest logit, at least
    `rtol`; default `export.PARITY_RTOL`; and the same predicted classes). int8 files: every weight, as
    onnxruntime folds and dequantizes it, equals the artifact's folded fp32 weight exactly (lossy
    exports: within one quantization step), and the integer kernels agree with the graph run in float.
    """
    from . import export
    from .export.onnxio import default_opset

    onnx_path = Path(onnx_path)
    source, artifact = _verify_artifact(Path(artifact_path), None)
    report = VerifyReport(onnx_path, "onnx", digest=source.digest)
    for check in source.checks:
        report.checks.append(Check(f"artifact {check.name}", check.ok, check.detail))
    if not source.ok:
        return report
    try:
        data = read_bytes(onnx_path, "ONNX model")
        external = check_onnx_external_data(onnx_path)
        proto = _parse_onnx(data, onnx_path)
    except MaskforgeError as exc:
        return report._fail("onnx file", str(exc))
    opset = default_opset(proto)
    report._pass(
        "onnx file",
        f"{len(data):,} bytes, opset {opset}"
        + (f", {len(external)} external data file(s) inside its folder" if external else ""),
    )
    info = _check_onnx_metadata(proto, artifact, report)
    if info is None:
        return report
    try:
        if info.precision == "int8":
            detail = _check_int8_outputs(onnx_path, artifact, opset)
        else:
            detail = _check_float_outputs(onnx_path, artifact, export.PARITY_RTOL if rtol is None else rtol)
    except MaskforgeError as exc:
        return report._fail("onnx outputs", str(exc))
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own types for malformed graphs
        return report._fail("onnx outputs", f"onnxruntime cannot run the model: {export.ort_message(exc)}")
    report._pass("onnx outputs", detail)
    return report


def _check_onnx_metadata(proto, artifact: Artifact, report: VerifyReport):
    """The file's maskforge metadata against the artifact: the parsed info, or None after a failure."""
    from . import export

    try:
        info = export.read_onnx_metadata(proto)
    except MaskforgeError as exc:
        report._fail("onnx metadata", str(exc))
        return None
    if not info.has_maskforge_metadata:
        report._fail("onnx metadata", "the ONNX file has no maskforge metadata (not exported by `maskforge export`)")
        return None
    for key, value in export.artifact_identity(artifact).items():
        got = info.metadata.get(export.META_PREFIX + key)
        if got != value:
            report._fail(
                "onnx metadata",
                f"metadata field {export.META_PREFIX}{key} is {got!r}, the artifact has "
                f"{value!r}" + (" (exported from a different artifact)" if key == "artifact_digest" else ""),
            )
            return None
    if info.spec != artifact.spec:
        report._fail(
            "onnx metadata", "metadata fields maskforge.preprocessing/class_names differ from the artifact's input spec"
        )
        return None
    report._pass(
        "onnx metadata",
        f"digest, arch, arch args, k, seed, init and input spec match the artifact "
        f"({info.storage} storage, {info.precision})",
    )
    return info


def _check_float_outputs(onnx_path: Path, artifact: Artifact, rtol: float) -> str:
    from .export.parity import PARITY_BATCH, compare_logits, parity_inputs
    from .export.sessions import ort_session, run_session
    from .materialization import materialize

    x = parity_inputs(artifact.spec)
    with torch.no_grad():
        expected = materialize(artifact)(x).float().numpy()
    session = ort_session(onnx_path)
    if len(session.get_inputs()) != 1:
        raise MaskforgeError(f"the ONNX model has {len(session.get_inputs())} inputs, expected 1")
    parity = compare_logits(run_session(session, x.numpy()), expected, rtol)
    if parity.failure is not None:
        raise MaskforgeError(f"{parity.failure} on a fixed batch of {PARITY_BATCH}")
    return (
        f"onnxruntime logits equal the materialized artifact's on {PARITY_BATCH} inputs (max abs difference "
        f"{parity.max_abs_diff:.2g} <= {parity.tolerance:.2g}, same classes)"
    )


def _check_int8_outputs(onnx_path: Path, artifact: Artifact, opset: int | None) -> str:
    """int8: the weights onnxruntime runs against the artifact's, then its kernels against float Q/DQ."""
    from onnx import numpy_helper

    from .export.int8 import folded_weights
    from .export.modes import EXACT_INT8, MIN_OPSET
    from .export.kernels import KERNEL_MAX_STEPS, check_kernels
    from .export.parity import parity_inputs
    from .export.trace import trace_to_onnx
    from .materialization import materialize

    exact = artifact.init in EXACT_INT8
    traced = trace_to_onnx(materialize(artifact), artifact.spec, opset or MIN_OPSET)
    reference = [numpy_helper.to_array(t) for t in traced.graph.initializer]
    weights = folded_weights(onnx_path)
    if not weights:
        raise MaskforgeError("the int8 file has no DequantizeLinear weights")
    for name, quantized, values in weights:
        if not any(ref.shape == values.shape and _weights_match(values, ref, quantized, exact) for ref in reference):
            raise MaskforgeError(
                f"int8 weight {name} {list(values.shape)} does not dequantize to any weight of the "
                f"artifact's network" + (" exactly" if exact else "")
            )
    kernels = check_kernels(onnx_path, parity_inputs(artifact.spec).numpy())
    return (
        f"{len(weights)} int8 weights dequantize to the artifact's folded weights"
        + (" exactly" if exact else " within one step")
        + f"; each of {kernels.tensors} quantized tensors, integer kernels vs float Q/DQ on the same inputs: "
        f"{kernels.max_steps} <= {KERNEL_MAX_STEPS} steps"
    )


def _weights_match(values: np.ndarray, reference: np.ndarray, quantized: np.ndarray, exact: bool) -> bool:
    if exact:
        return bool(np.array_equal(values, reference))
    nonzero = quantized != 0
    step = float(np.abs(values[nonzero] / quantized[nonzero]).max()) if nonzero.any() else 0.0
    return bool(np.abs(values - reference).max() <= step)


def _parse_onnx(data: bytes, path: Path):
    import onnx

    try:
        return onnx.load_from_string(data)
    except Exception as exc:  # noqa: BLE001 - protobuf raises DecodeError and friends
        raise MaskforgeError(f"{path} is not an ONNX model ({type(exc).__name__})") from None


def check_onnx_external_data(model: str | os.PathLike, base_dir: str | os.PathLike | None = None) -> list[Path]:
    """Refuse external-data locations that are absolute or resolve outside the model's folder.

    `model` is an ONNX file path (parsed without loading external data) or an `onnx.ModelProto` (then
    `base_dir` is the folder its external data is relative to). Symlinks are resolved before comparing,
    so a link inside the folder that points outside it is refused too. Returns the resolved files the
    model references (empty for a self-contained model). Call this before `onnx.load` (which follows
    the locations) or `onnxruntime.InferenceSession` on any ONNX file you did not write yourself.

    >>> check_onnx_external_data("model.onnx")     # doctest: +SKIP
    []
    """
    import onnx

    if isinstance(model, (str, os.PathLike)):
        path = Path(model)
        proto = _parse_onnx(read_bytes(path, "ONNX model"), path)
        base = Path(base_dir) if base_dir is not None else (path.parent if str(path.parent) else Path("."))
    else:
        proto, base = model, Path(base_dir if base_dir is not None else ".")
    assert isinstance(proto, onnx.ModelProto), "expected an onnx.ModelProto or a path"
    root = base.resolve()
    files: list[Path] = []
    for tensor in _model_tensors(proto):
        if tensor.data_location != onnx.TensorProto.EXTERNAL and not tensor.external_data:
            continue
        entries = {entry.key: entry.value for entry in tensor.external_data}
        location = entries.get("location", "")
        where = f"ONNX tensor {tensor.name!r}: external data location {location!r}"
        if not location or "\x00" in location:
            raise MaskforgeError(f"{where} is empty or invalid")
        if os.path.isabs(location) or location.startswith(("/", "\\")) or (len(location) > 1 and location[1] == ":"):
            raise MaskforgeError(f"{where} is an absolute path; refusing to read files outside the model's folder")
        parts = location.replace("\\", "/").split("/")
        if ".." in parts:
            raise MaskforgeError(f"{where} climbs out of the model's folder ('..'); refusing it")
        target = (root / location).resolve()
        if target != root and root not in target.parents:
            raise MaskforgeError(
                f"{where} resolves to {target}, outside the model's folder {root} (a symlink?); refusing it"
            )
        if target not in files:
            files.append(target)
    return files


def _model_tensors(proto):
    """Every TensorProto of a model: its graph's and those of its model-local functions (`proto.functions`,
    whose nodes may hold Constant tensors with external data like any graph's)."""
    yield from _all_tensors(proto.graph)
    for function in proto.functions:
        yield from _node_tensors(function.node)


def _all_tensors(graph):
    """Every TensorProto of a graph: initializers, sparse initializers, attribute tensors, subgraphs."""
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    yield from _node_tensors(graph.node)


def _node_tensors(nodes):
    """The tensors in the attributes of `nodes`, subgraphs included."""
    for node in nodes:
        for attribute in node.attribute:
            if attribute.HasField("t"):
                yield attribute.t
            yield from attribute.tensors
            if attribute.HasField("sparse_tensor"):
                yield attribute.sparse_tensor.values
                yield attribute.sparse_tensor.indices
            for sparse in attribute.sparse_tensors:
                yield sparse.values
                yield sparse.indices
            if attribute.HasField("g"):
                yield from _all_tensors(attribute.g)
            for subgraph in attribute.graphs:
                yield from _all_tensors(subgraph)


def _strip_label(message: str, path: Path) -> str:
    """Loader messages start with the file name; the report already names the file."""
    for prefix in (f"{path}: ", f"{path} "):
        if message.startswith(prefix) and prefix.endswith(": "):
            return message[len(prefix) :]
    return message

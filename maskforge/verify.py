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

from . import regen
from .artifact import Artifact, artifact_from_bytes, check_weight_digests
from .errors import MaskforgeError
from .fileio import read_bytes

ONNX_BATCH = 4          # images in the fixed batch that compares onnxruntime with PyTorch
ONNX_SEED = 20200601    # seed of that batch (torch.Generator; the batch need not be portable)


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
    kind: str                                   # "artifact" | "onnx"
    checks: list[Check] = field(default_factory=list)
    digest: str | None = None                   # the artifact's digest, when it could be read

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
        return {"path": str(self.path), "kind": self.kind, "ok": self.ok, "digest": self.digest,
                "checks": [check.to_dict() for check in self.checks]}

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


def _load_with_report(data: bytes, path: Path, report: VerifyReport
                      ) -> tuple[Artifact | None, tuple[str, str] | None]:
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
    shapes = {param: tuple(info["shape"]) for param, info in artifact.document["layers"].items()}
    generated = regen.generate_many(artifact.seed, shapes, artifact.init, k=artifact.k,
                                    scale_fan=artifact.scale_fan, digests=True, keep=False,
                                    threads=threads)
    try:
        check_weight_digests(artifact, {param: digest for param, (_, digest) in generated.items()})
    except MaskforgeError as exc:
        report._fail("weights", str(exc))
        return
    report._pass("weights", f"{len(shapes)} layers ({artifact.masked_weights:,} weights) regenerated from seed "
                            f"{artifact.seed} match their sha256")


# --- ONNX exports ----------------------------------------------------------------------------------------

def verify_onnx(onnx_path: str | os.PathLike, artifact_path: str | os.PathLike, *,
                atol: float | None = None) -> VerifyReport:
    """Check that an ONNX file is an export of `artifact_path` and computes what the artifact does.

    Checks, in order: the artifact itself (all of `verify_artifact`), the ONNX file's external-data
    locations, that it parses, that its maskforge metadata names the artifact's digest, arch, arch args,
    k, seed and init, and that onnxruntime's logits equal the materialized artifact's on a fixed batch
    (max abs difference <= `atol`, default `export.PARITY_ATOL`, and the same predicted classes).
    """
    from . import export
    from .materialize import materialize

    onnx_path = Path(onnx_path)
    atol = export.PARITY_ATOL if atol is None else atol
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
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    report._pass("onnx file", f"{len(data):,} bytes, opset {opset}"
                              + (f", {len(external)} external data file(s) inside its folder" if external else ""))

    try:
        info = export.read_onnx_metadata(proto)
    except MaskforgeError as exc:
        return report._fail("onnx metadata", str(exc))
    if not info.has_maskforge_metadata:
        return report._fail("onnx metadata", "the ONNX file has no maskforge metadata (not exported by "
                                             "`maskforge export`)")
    meta = info.metadata
    expected = export.artifact_identity(artifact)
    for key, value in expected.items():
        got = meta.get(export.META_PREFIX + key)
        if got != value:
            return report._fail("onnx metadata", f"metadata field {export.META_PREFIX}{key} is {got!r}, the "
                                                 f"artifact has {value!r}"
                                + (" (exported from a different artifact)" if key == "artifact_digest" else ""))
    if info.spec != artifact.spec:
        return report._fail("onnx metadata", "metadata fields maskforge.preprocessing/class_names differ from the "
                                             "artifact's input spec")
    report._pass("onnx metadata", "digest, arch, arch args, k, seed, init and input spec match the artifact")

    try:
        model = materialize(artifact)
        generator = torch.Generator().manual_seed(ONNX_SEED)
        spec = artifact.spec
        x = torch.randn(ONNX_BATCH, spec.channels, spec.height, spec.width, generator=generator)
        with torch.no_grad():
            expected_out = model(x).float().numpy()
        session = export.ort_session(onnx_path)
        inputs = session.get_inputs()
        if len(inputs) != 1:
            raise MaskforgeError(f"the ONNX model has {len(inputs)} inputs, expected 1")
        got = session.run(None, {inputs[0].name: x.numpy()})[0]
    except MaskforgeError as exc:
        return report._fail("onnx outputs", str(exc))
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own types for malformed graphs
        return report._fail("onnx outputs", f"onnxruntime cannot run the model: {type(exc).__name__}: "
                                            f"{' '.join(str(exc).split())[:300]}")
    if got.shape != expected_out.shape:
        return report._fail("onnx outputs", f"onnxruntime output shape {list(got.shape)} differs from the "
                                            f"artifact's {list(expected_out.shape)}")
    diff = float(np.abs(got.astype(np.float64) - expected_out).max())
    if not np.isfinite(diff) or diff > atol:
        return report._fail("onnx outputs", f"onnxruntime logits differ from the artifact's by up to {diff:.3g} "
                                            f"(> {atol}) on a fixed batch of {ONNX_BATCH}")
    disagree = [row for row in range(len(got)) if got[row].argmax() != expected_out[row].argmax()
                and _top_gap(expected_out[row]) > atol]
    if disagree:
        return report._fail("onnx outputs", f"onnxruntime predicts a different class for example {disagree[0]} "
                                            f"of the fixed batch")
    report._pass("onnx outputs", f"onnxruntime logits equal the materialized artifact's on {ONNX_BATCH} inputs "
                                 f"(max abs difference {diff:.2g} <= {atol}, same classes)")
    return report


def _top_gap(row: np.ndarray) -> float:
    if row.size < 2:
        return float("inf")
    top = np.sort(row)[-2:]
    return float(top[1] - top[0])


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
    for tensor in _all_tensors(proto.graph):
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
            raise MaskforgeError(f"{where} resolves to {target}, outside the model's folder {root} (a symlink?); "
                                 f"refusing it")
        if target not in files:
            files.append(target)
    return files


def _all_tensors(graph):
    """Every TensorProto of a graph: initializers, sparse initializers, attribute tensors, subgraphs."""
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
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
            return message[len(prefix):]
    return message

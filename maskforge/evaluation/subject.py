"""The model under test: an artifact or an ONNX file, its preprocessing, and how it was exported.

Preprocessing comes from the maskforge metadata that `export_onnx` writes (or the artifact's input
spec); an ONNX file without metadata needs `mean` and `std` (and `size` when its graph does not fix the
image side). The ONNX graph's input and output are checked against that spec before anything runs, so a
wrong size or a foreign model is one clear error instead of an onnxruntime failure mid-run.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from ..artifact import Artifact, load_artifact
from ..data import InputSpec
from ..errors import MaskforgeError, first_line
from ..fileio import missing_reason
from ..export import META_PREFIX, OnnxModelInfo, read_onnx_metadata
from ..export.modes import PRECISIONS, STORAGES
from ..export.onnxio import WEIGHT_OPS
from ..filekind import file_kind
from ..verify import check_onnx_external_data

_QUANTIZED_OPS = {
    "QuantizeLinear",
    "DequantizeLinear",
    "QLinearConv",
    "QLinearMatMul",
    "ConvInteger",
    "MatMulInteger",
    "DynamicQuantizeLinear",
}
_FLOAT = 1  # onnx.TensorProto.FLOAT


@dataclass
class Subject:
    """What evaluation and prediction need to know about the model under test."""

    path: Path  # the file given
    kind: str  # "artifact" | "onnx"
    spec: InputSpec  # preprocessing; class_names are placeholders unless names_known
    names_known: bool
    preprocessing: str  # "metadata" | "given" | "metadata, overridden"
    info: OnnxModelInfo
    artifact: Artifact | None = None
    onnx_path: Path | None = None  # for an artifact: set once it is exported
    proto: object | None = None  # the parsed ONNX model (without external data)
    storage: str | None = None
    precision: str | None = None
    notes: list[str] = field(default_factory=list)
    classes_known: bool = True  # False: a foreign graph whose output does not fix the class count
    exported_here: bool = False  # written by this process from an artifact (its failures are maskforge's)

    def provenance(self) -> dict:
        if self.artifact is not None:
            provenance = self.artifact.document.get("provenance", {})
        else:
            provenance = self.info.get_json("provenance", {}) or {}
        return provenance if isinstance(provenance, dict) else {}


def open_model(
    path: str | os.PathLike,
    *,
    mean: Sequence[float] | str | None = None,
    std: Sequence[float] | str | None = None,
    size: int | None = None,
) -> Subject:
    """Open an artifact or an ONNX file and work out its preprocessing (raises `MaskforgeError`)."""
    path = Path(path)
    overrides = preprocessing_overrides(mean, std, size)
    kind = file_kind(path)
    if kind.kind == "missing":
        raise MaskforgeError(f"model {path} {missing_reason(path)}")
    if kind.kind == "folder":
        raise MaskforgeError(f"model {path} is a folder; give an .onnx file or an artifact")
    if kind.kind in ("torch_export", "checkpoint", "image"):
        raise MaskforgeError(f"{path} is {kind.description}; give the artifact or an ONNX export of it")
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise MaskforgeError(f"cannot read {path}: {exc.strerror or exc}") from None
    if kind.kind in ("artifact", "safetensors"):
        return _open_artifact(path, overrides)
    return open_onnx(path, overrides)


def preprocessing_overrides(mean, std, size) -> dict:
    out = {}
    if mean is not None:
        out["mean"] = parse_floats(mean, "mean")
    if std is not None:
        out["std"] = parse_floats(std, "std")
    if size is not None:
        if isinstance(size, bool) or not (isinstance(size, int) and size >= 1):
            raise MaskforgeError(f"size must be a positive integer, got {size!r}")
        out["size"] = size
    return out


def parse_floats(value: Sequence[float] | str, name: str) -> tuple[float, ...]:
    """`"0.485,0.456,0.406"` or a sequence -> a tuple of floats (mean and std, one per channel)."""
    try:
        items = value.split(",") if isinstance(value, str) else list(value)
        numbers = tuple(float(item) for item in items)
    except (TypeError, ValueError):
        raise MaskforgeError(f"{name} must be comma-separated numbers, one per channel, got {value!r}") from None
    if not numbers or not all(math.isfinite(v) for v in numbers):
        raise MaskforgeError(f"{name} must be finite numbers, got {value!r}")
    return numbers


def _open_artifact(path: Path, overrides: dict) -> Subject:
    artifact = load_artifact(path)
    native = artifact.spec
    if overrides.get("size", native.height) != native.height or native.height != native.width and "size" in overrides:
        raise MaskforgeError(
            f"{path} takes {native.channels}x{native.height}x{native.width} images; size "
            f"{overrides['size']} does not apply to it"
        )
    spec = _apply_overrides(artifact.spec, overrides)
    return Subject(path, "artifact", spec, True, _source(overrides), OnnxModelInfo(None, None, {}), artifact)


def _source(overrides: dict) -> str:
    return "metadata, overridden" if overrides else "metadata"


def open_onnx(path: Path, overrides: dict | None = None) -> Subject:
    """An ONNX file as a `Subject` (also used for the files `compare` exports)."""
    overrides = overrides or {}
    proto = load_onnx(path)
    info = read_onnx_metadata(proto)
    dims = graph_input_dims(proto, path)
    if info.spec is not None:
        spec, names_known, source = _apply_overrides(info.spec, overrides), True, _source(overrides)
    else:
        spec, names_known, source = _spec_from_graph(path, proto, dims, overrides), False, "given"
    subject = Subject(
        path,
        "onnx",
        spec,
        names_known,
        source,
        info,
        onnx_path=path,
        proto=proto,
        classes_known=names_known or _output_classes(proto) is not None,
    )
    subject.storage, subject.precision, subject.notes = export_mode(info, proto)
    check_graph_io(subject, dims)
    return subject


def load_onnx(path: Path):
    import onnx

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - protobuf's DecodeError and friends
        raise MaskforgeError(
            f"{path} is not a readable ONNX model (truncated or not ONNX: {first_line(exc)})"
        ) from None
    # Before onnxruntime opens it: refuse external-data locations outside the model's folder.
    check_onnx_external_data(proto, path.parent if str(path.parent) else Path("."))
    if not proto.graph.node or not proto.graph.input or not proto.graph.output:
        raise MaskforgeError(f"{path} is not a usable ONNX model (empty graph: truncated or not ONNX)")
    try:
        onnx.checker.check_model(proto)
    except Exception as exc:  # noqa: BLE001 - ValidationError, or protobuf errors on odd files
        raise MaskforgeError(f"{path} is not a valid ONNX model ({first_line(exc)})") from None
    return proto


def _spec_from_graph(path: Path, proto, dims: list, overrides: dict) -> InputSpec:
    """Preprocessing of an ONNX file without metadata: mean/std given, channels and size from the graph."""
    static_side = dims[2] if isinstance(dims[2], int) and dims[2] > 0 and dims[2] == dims[3] else None
    size = overrides.get("size") or static_side
    missing = [
        name
        for name, value in (("mean", overrides.get("mean")), ("std", overrides.get("std")), ("size", size))
        if value is None
    ]
    if missing:
        raise MaskforgeError(
            f"{path} has no maskforge metadata, so its preprocessing is unknown; give "
            f"{', '.join('--' + name for name in missing)} (Python: {', '.join(missing)}=...), e.g. "
            f"--mean 0.1307 --std 0.3081 --size 28"
        )
    channels = dims[1] if isinstance(dims[1], int) and dims[1] > 0 else len(overrides["mean"])
    classes = _output_classes(proto) or 1  # unknown: the data's classes are adopted (load_matching_data)
    try:
        return InputSpec(
            channels, size, size, overrides["mean"], overrides["std"], tuple(str(i) for i in range(classes))
        )
    except MaskforgeError as exc:
        raise MaskforgeError(f"{path}: {exc} (the model takes {channels} channel(s))") from None


def _apply_overrides(spec: InputSpec, overrides: dict) -> InputSpec:
    if not overrides:
        return spec
    size = overrides.get("size")
    try:
        return InputSpec(
            spec.channels,
            size or spec.height,
            size or spec.width,
            overrides.get("mean", spec.mean),
            overrides.get("std", spec.std),
            spec.class_names,
        )
    except MaskforgeError as exc:
        raise MaskforgeError(f"bad preprocessing override: {exc}") from None


# --- the graph's input and output --------------------------------------------------------------------------


def graph_dims(value_info) -> list:
    """Dimensions of a graph value: ints where fixed, the symbolic name (or None) where not."""
    return [
        d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in value_info.type.tensor_type.shape.dim
    ]


def _real_inputs(proto) -> list:
    initializers = {t.name for t in proto.graph.initializer}  # IR < 4 lists initializers as inputs too
    return [value for value in proto.graph.input if value.name not in initializers]


def graph_input_dims(proto, path: Path) -> list:
    """The dims of the graph's one image input, [batch, C, H, W] (raises for anything else)."""
    inputs = _real_inputs(proto)
    if len(inputs) != 1:
        raise MaskforgeError(
            f"{path} takes {len(inputs)} inputs ({', '.join(v.name for v in inputs)}); "
            f"maskforge evaluates image classifiers with one image input"
        )
    dims = graph_dims(inputs[0])
    if len(dims) != 4:
        raise MaskforgeError(
            f"{path}: input {inputs[0].name!r} has shape {_shape(dims)}; maskforge feeds images "
            f"as [batch, channels, height, width]"
        )
    return dims


def _output_classes(proto) -> int | None:
    outputs = graph_dims(proto.graph.output[0])
    return outputs[-1] if outputs and isinstance(outputs[-1], int) and outputs[-1] > 0 else None


def check_graph_io(subject: Subject, dims: list) -> None:
    """The graph must take float32 [batch, C, H, W] images of the spec's shape and give [batch, classes]."""
    proto, spec, path = subject.proto, subject.spec, subject.path
    value = _real_inputs(proto)[0]
    if value.type.tensor_type.elem_type != _FLOAT:
        raise MaskforgeError(
            f"{path}: input {value.name!r} is not float32 (ONNX element type "
            f"{value.type.tensor_type.elem_type}); maskforge feeds normalized float32 images"
        )
    wanted = [spec.channels, spec.height, spec.width]
    if any(isinstance(got, int) and got > 0 and got != want for got, want in zip(dims[1:], wanted)):
        given = "" if subject.preprocessing == "metadata" else " (check size and the mean/std channels)"
        raise MaskforgeError(
            f"{path} takes {'x'.join(map(str, dims[1:]))} images (its ONNX input "
            f"{value.name!r} is {_shape(dims)}), but the preprocessing gives "
            f"{'x'.join(map(str, wanted))}{given}"
        )
    outputs = graph_dims(proto.graph.output[0])
    if len(outputs) == 2 and isinstance(outputs[1], int) and outputs[1] > 0 and outputs[1] != spec.num_classes:
        raise MaskforgeError(
            f"{path}: output {proto.graph.output[0].name!r} has {outputs[1]} classes, its "
            f"metadata names {spec.num_classes}"
        )
    if outputs and len(outputs) != 2:
        raise MaskforgeError(
            f"{path}: output {proto.graph.output[0].name!r} has shape {_shape(outputs)}; "
            f"expected [batch, classes] logits"
        )


def _shape(dims: list) -> str:
    return "[" + ", ".join(str(d) if d is not None else "?" for d in dims) + "]"


# --- how it was exported -----------------------------------------------------------------------------------


def export_mode(info: OnnxModelInfo, proto) -> tuple[str | None, str | None, list[str]]:
    """(storage, precision, notes) from the metadata, or inferred from the graph of a foreign model."""
    notes: list[str] = []
    if info.has_maskforge_metadata:
        storage = info.storage
        precision = info.metadata.get(META_PREFIX + "precision") or "fp32"  # before int8 existed: fp32
        if storage not in STORAGES:
            notes.append(f"storage {storage!r} is unknown to this maskforge (a newer export?)")
        if precision not in PRECISIONS:
            notes.append(f"precision {precision!r} is unknown to this maskforge (a newer export?)")
        return storage, precision, notes
    ops = {node.op_type for node in proto.graph.node}
    precision = "int8" if ops & _QUANTIZED_OPS else ("fp32" if all_weights_constant(proto) else None)
    storage = "dense" if all_weights_constant(proto) else None
    notes.append("no maskforge metadata: storage and precision inferred from the graph")
    return storage, precision, notes


def all_weights_constant(proto) -> bool:
    """Every Conv/Gemm/MatMul weight is a float32 initializer (a plain dense graph)."""
    initializers = {t.name: t for t in proto.graph.initializer}
    weights = [node.input[1] for node in proto.graph.node if node.op_type in WEIGHT_OPS and len(node.input) > 1]
    return bool(weights) and all(name in initializers and initializers[name].data_type == _FLOAT for name in weights)

"""Export an artifact for deployment: ONNX (dense or compact) or a PyTorch safetensors state dict.

ONNX export traces the materialized network with PyTorch's TorchScript-based exporter (it needs no
extra packages and folds each batch norm into the preceding convolution), then post-processes the graph
with the `onnx` package:

* **dense** keeps every weight as a float32 initializer.
* **compact** replaces each convolution/matmul weight by packed `uint8` initializers plus a small
  subgraph of standard ONNX operators whose inputs are all constants, so onnxruntime folds it back into
  the dense weight when the session starts (docs/DEPLOY.md specifies the encoding bit by bit):
  the mask (1 bit per weight, the nonzero pattern of the weight), then either one sign bit per *kept*
  weight and a float32 magnitude per output channel (signed-constant weights: about 1 + k bits per
  weight), or the kept float32 values (any other distribution). The expansion reproduces the dense
  initializer bit for bit, so compact and dense models compute the same outputs.

Every file is written to a temporary name, loaded back by onnxruntime with default session options and
compared with the PyTorch model (max abs difference <= 1e-4, same argmax) before it is renamed into
place: a file that fails the check is never left behind.

>>> result = export_onnx("runs/demo/artifact.safetensors", "model.onnx", compact=True)   # doctest: +SKIP
>>> result.bits_per_weight < 2.05                                                          # doctest: +SKIP
True
"""

from __future__ import annotations

import io
import json
import os
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from . import __version__
from .artifact import Artifact, artifact_bytes
from .data import InputSpec
from .errors import MaskforgeError
from .fileio import atomic_path
from .materialize import as_artifact, materialize, plain_structure

DEFAULT_OPSET = 17
MIN_OPSET, MAX_OPSET = 13, 20       # 13: Unsqueeze/Slice with tensor inputs; 20: the TorchScript exporter's max
INPUT_NAME, OUTPUT_NAME = "input", "logits"
PARITY_ATOL = 1e-4                  # onnxruntime vs PyTorch, max abs difference of the logits
PARITY_BATCH = 3
META_PREFIX = "maskforge."
TORCH_EXPORT_KEY = "maskforge_torch_export"
TORCH_EXPORT_FORMAT = "maskforge-torch-export"
_WEIGHT_OPS = ("Conv", "Gemm", "MatMul")   # input 1 of these, when a float initializer, is a weight


@dataclass
class ExportResult:
    """What an export wrote and how it checked out."""

    path: Path
    format: str                    # "onnx" | "torch"
    layout: str                    # "compact" | "dense" (ONNX), "state_dict" (torch)
    file_bytes: int
    masked_weights: int
    kept_weights: int
    bits_per_weight: float         # 8 * file_bytes / masked_weights
    max_abs_diff: float | None     # onnxruntime (or reloaded torch) vs the materialized model
    opset: int | None
    seconds: float

    def to_dict(self) -> dict:
        out = asdict(self)
        out["path"] = str(self.path)
        return out


# --- public API ----------------------------------------------------------------------------------------

def default_export_path(artifact_path: str | os.PathLike | None, fmt: str = "onnx", compact: bool = True) -> Path:
    """`runs/x/artifact.safetensors` -> `runs/x/artifact.onnx`, `artifact.dense.onnx`, `artifact.torch.safetensors`."""
    base = Path(artifact_path) if artifact_path is not None else Path("model.safetensors")
    stem = base.name[: -len(".safetensors")] if base.name.endswith(".safetensors") else base.stem
    suffix = ".torch.safetensors" if fmt == "torch" else (".onnx" if compact else ".dense.onnx")
    return base.with_name(stem + suffix)


def export_onnx(artifact: Artifact | str | os.PathLike, out: str | os.PathLike | None = None, *,
                compact: bool = True, opset: int = DEFAULT_OPSET, check: bool = True, threads: int | None = None,
                model: nn.Module | None = None) -> ExportResult:
    """Write the artifact's network as an ONNX file (compact or dense) and check it in onnxruntime.

    `model` may pass an already materialized network to skip regenerating the weights. With `check`
    (the default) the file is loaded by onnxruntime with default options and compared with PyTorch
    before it is moved into place; a failure raises `MaskforgeError` and leaves nothing behind.
    """
    started = time.perf_counter()
    artifact = _with_digest(as_artifact(artifact))
    out = Path(out) if out is not None else default_export_path(artifact.path, "onnx", compact)
    check_output_path(out)
    if not (isinstance(opset, int) and MIN_OPSET <= opset <= MAX_OPSET):
        raise MaskforgeError(f"opset must be an integer from {MIN_OPSET} to {MAX_OPSET}, got {opset!r}")
    if model is None:
        model = materialize(artifact, threads=threads)
    proto = _trace_to_onnx(model, artifact.spec, opset)
    if compact:
        compact_weights(proto, expect_total=artifact.masked_weights, expect_kept=artifact.kept_weights)
    _set_metadata(proto, artifact, "compact" if compact else "dense")
    _finalize(proto)
    data = proto.SerializeToString()
    diff = None
    with atomic_path(out) as tmp:
        tmp.write_bytes(data)
        if check:
            diff = check_onnx_parity(tmp, model, artifact.spec)
    return ExportResult(out, "onnx", "compact" if compact else "dense", len(data), artifact.masked_weights,
                        artifact.kept_weights, 8.0 * len(data) / artifact.masked_weights, diff, opset,
                        time.perf_counter() - started)


def export_torch(artifact: Artifact | str | os.PathLike, out: str | os.PathLike | None = None, *,
                 threads: int | None = None, model: nn.Module | None = None) -> ExportResult:
    """Write the materialized network's state dict as `.safetensors` plus the JSON needed to rebuild it.

    Reload with `load_torch_export(path)` (needs maskforge for the architecture code, nothing else).
    """
    from safetensors.torch import save_file

    started = time.perf_counter()
    artifact = _with_digest(as_artifact(artifact))
    out = Path(out) if out is not None else default_export_path(artifact.path, "torch")
    check_output_path(out)
    if model is None:
        model = materialize(artifact, threads=threads)
    document = {
        "format": TORCH_EXPORT_FORMAT, "format_version": 1, "maskforge_version": __version__,
        "arch": {"name": artifact.arch, "args": artifact.arch_args}, "k": artifact.k, "seed": artifact.seed,
        "init": {"distribution": artifact.init, "scale_fan": artifact.scale_fan},
        "input": artifact.spec.to_dict(), "artifact_digest": artifact.digest,
        "layers": "plain bias-free Conv2d/Linear holding weight*mask; non-affine BatchNorm2d with running stats",
    }
    state = {name: tensor.detach().contiguous() for name, tensor in model.state_dict().items()}
    diff = None
    with atomic_path(out) as tmp:
        save_file(state, str(tmp), metadata={TORCH_EXPORT_KEY: json.dumps(document, sort_keys=True)})
        reloaded = load_torch_export(tmp)
        x = _parity_inputs(artifact.spec)
        with torch.no_grad():
            diff = float((reloaded(x) - model(x)).abs().max())
        if diff != 0.0:
            raise MaskforgeError(f"the reloaded torch export differs from the materialized model (max abs diff "
                                 f"{diff:.3g}); nothing was written")
    size = out.stat().st_size
    return ExportResult(out, "torch", "state_dict", size, artifact.masked_weights, artifact.kept_weights,
                        8.0 * size / artifact.masked_weights, diff, None, time.perf_counter() - started)


def load_torch_export(path: str | os.PathLike) -> nn.Module:
    """Rebuild the plain network written by `export_torch` (eval mode).

    >>> model = load_torch_export("runs/demo/artifact.torch.safetensors")   # doctest: +SKIP
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        state = load_file(str(path))
    except FileNotFoundError:
        raise MaskforgeError(f"{path} does not exist") from None
    except Exception as exc:  # noqa: BLE001 - safetensors raises several types for foreign files
        raise MaskforgeError(f"{path} is not a safetensors file ({_first_line(exc)})") from None
    if TORCH_EXPORT_KEY not in metadata:
        raise MaskforgeError(f"{path} is not a maskforge torch export (no '{TORCH_EXPORT_KEY}' metadata)")
    try:
        document = json.loads(metadata[TORCH_EXPORT_KEY])
        arch, args, k = document["arch"]["name"], document["arch"]["args"], document["k"]
        if not (isinstance(arch, str) and isinstance(args, dict) and isinstance(k, float) and 0.0 < k <= 1.0):
            raise TypeError("bad arch, args or k")
    except (ValueError, KeyError, TypeError) as exc:
        raise MaskforgeError(f"{path}: damaged maskforge torch-export metadata ({_first_line(exc)})") from None
    model = plain_structure(arch, args, k)
    model.to_empty(device="cpu")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise MaskforgeError(f"{path}: state dict does not match architecture {document['arch']['name']} "
                             f"({_first_line(exc)})") from None
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model.eval()


def check_output_path(path: str | os.PathLike) -> Path:
    """Fail early (before any expensive work) if `path` cannot be written as a file."""
    path = Path(path)
    if path.is_dir():
        raise MaskforgeError(f"output {path} is a folder; give a file name")
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.exists():
        raise MaskforgeError(f"cannot write {path}: folder {folder} does not exist")
    if not folder.is_dir():
        raise MaskforgeError(f"cannot write {path}: {folder} is not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise MaskforgeError(f"cannot write {path}: folder {folder} is not writable")
    return path


def _with_digest(artifact: Artifact) -> Artifact:
    """An artifact built in memory (never saved) gets the digests and size its file would have."""
    if "document" not in artifact.document.get("digests", {}) or artifact.file_bytes is None:
        artifact.file_bytes = len(artifact_bytes(artifact))
    return artifact


# --- metadata ------------------------------------------------------------------------------------------

def artifact_identity(artifact: Artifact) -> dict[str, str]:
    """The metadata_props values that tie an ONNX file to its source artifact (`verify` compares them)."""
    return {
        "artifact_digest": artifact.digest,
        "arch": artifact.arch,
        "arch_args": json.dumps(artifact.arch_args, sort_keys=True),
        "k": repr(float(artifact.k)),
        "seed": str(artifact.seed),
        "init": artifact.init,
        "scale_fan": json.dumps(bool(artifact.scale_fan)),
    }


def _set_metadata(proto, artifact: Artifact, layout: str) -> None:
    spec = artifact.spec
    bn_values = sum(stat.numel() for stat in artifact.bn_stats.values())
    entries = {
        "version": __version__,
        "onnx_format": layout,
        **artifact_identity(artifact),
        "artifact_bytes": str(artifact.file_bytes if artifact.file_bytes is not None else ""),
        "preprocessing": json.dumps({
            "layout": "NCHW", "channels": spec.channels, "height": spec.height, "width": spec.width,
            "scale": "1/255", "mean": list(spec.mean), "std": list(spec.std),
            "formula": "x = (pixel / 255 - mean[c]) / std[c]"}, sort_keys=True),
        "class_names": json.dumps(list(spec.class_names)),
        "masked_weights": str(artifact.masked_weights),
        "kept_weights": str(artifact.kept_weights),
        "bn_values": str(bn_values),
        "provenance": json.dumps(artifact.document.get("provenance", {}), sort_keys=True),
    }
    del proto.metadata_props[:]
    for key, value in entries.items():
        prop = proto.metadata_props.add()
        prop.key, prop.value = META_PREFIX + key, value
    proto.producer_name, proto.producer_version = "maskforge", __version__
    proto.doc_string = (f"maskforge {artifact.arch} k={artifact.k} seed={artifact.seed} ({layout}); input "
                        f"{spec.channels}x{spec.height}x{spec.width} NCHW float32 normalized as "
                        f"(pixel/255 - mean)/std; output: logits over {spec.num_classes} classes")


@dataclass
class OnnxModelInfo:
    """What maskforge knows about an ONNX file from its `metadata_props` (None where absent)."""

    spec: InputSpec | None
    layout: str | None
    metadata: dict[str, str]

    @property
    def has_maskforge_metadata(self) -> bool:
        return self.spec is not None

    def get_int(self, key: str) -> int | None:
        value = self.metadata.get(META_PREFIX + key, "")
        return int(value) if value.strip().lstrip("-").isdigit() else None

    def get_json(self, key: str, default=None):
        try:
            return json.loads(self.metadata[META_PREFIX + key])
        except (KeyError, ValueError):
            return default


def read_onnx_metadata(proto_or_map) -> OnnxModelInfo:
    """Parse maskforge's `metadata_props` from an `onnx.ModelProto` or a plain {key: value} map."""
    if isinstance(proto_or_map, dict):
        metadata = dict(proto_or_map)
    else:
        metadata = {prop.key: prop.value for prop in proto_or_map.metadata_props}
    if META_PREFIX + "preprocessing" not in metadata:
        return OnnxModelInfo(None, None, metadata)
    try:
        pre = json.loads(metadata[META_PREFIX + "preprocessing"])
        names = json.loads(metadata.get(META_PREFIX + "class_names", "null"))
        spec = InputSpec(pre["channels"], pre["height"], pre["width"], pre["mean"], pre["std"], names)
    except (ValueError, KeyError, TypeError, MaskforgeError) as exc:
        raise MaskforgeError(f"the model's maskforge metadata is corrupt ({_first_line(exc)})") from None
    return OnnxModelInfo(spec, metadata.get(META_PREFIX + "onnx_format"), metadata)


# --- tracing and finishing -----------------------------------------------------------------------------

def _trace_to_onnx(model: nn.Module, spec: InputSpec, opset: int):
    import onnx

    example = torch.zeros(1, spec.channels, spec.height, spec.width)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # The TorchScript exporter is deprecated in favour of the dynamo one, which needs onnxscript.
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(model, (example,), buffer, dynamo=False, opset_version=opset,
                              input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                              dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                              do_constant_folding=True)
        except TypeError as exc:  # pragma: no cover - a torch without the TorchScript exporter
            raise MaskforgeError(f"this PyTorch ({torch.__version__}) cannot export ONNX with the TorchScript "
                                 f"exporter ({_first_line(exc)})") from None
    return onnx.load_from_string(buffer.getvalue())


def _finalize(proto) -> None:
    """Pin the IR version to the lowest the opset needs (onnxruntime refuses IR versions it does not know)."""
    import onnx

    proto.ir_version = onnx.helper.find_min_ir_version_for(list(proto.opset_import))
    try:
        onnx.checker.check_model(proto)
    except onnx.checker.ValidationError as exc:  # pragma: no cover - would be a maskforge bug
        raise MaskforgeError(f"the exported ONNX graph is invalid ({_first_line(exc)})") from None


def _parity_inputs(spec: InputSpec, batch: int = PARITY_BATCH) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randn(batch, spec.channels, spec.height, spec.width, generator=generator)


def ort_session(path: str | os.PathLike, threads: int | None = None):
    """An onnxruntime CPU session with default options (except the thread count when given)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: warnings would clutter the command line's output
    if threads:
        options.intra_op_num_threads = int(threads)
        options.inter_op_num_threads = 1
    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
        raise MaskforgeError(f"onnxruntime cannot load {path}: {_first_line(exc)}") from None


def check_onnx_parity(path: str | os.PathLike, model: nn.Module, spec: InputSpec,
                      atol: float = PARITY_ATOL) -> float:
    """Run the ONNX file and the PyTorch model on the same batch; return the max abs difference or raise.

    The argmax must agree for every example, except where PyTorch's two best logits are closer than
    `atol` (a tie within float32 rounding is not a disagreement).
    """
    x = _parity_inputs(spec)
    with torch.no_grad():
        expected = model(x).float().numpy()
    session = ort_session(path)
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    if got.shape != expected.shape:
        raise MaskforgeError(f"onnxruntime output shape {got.shape} differs from PyTorch's {expected.shape}")
    diff = float(np.abs(got.astype(np.float64) - expected).max())
    if not np.isfinite(diff) or diff > atol:
        raise MaskforgeError(f"onnxruntime and PyTorch disagree: max abs difference {diff:.3g} > {atol}; "
                             f"the ONNX file was not written")
    top2 = np.sort(expected, axis=1)[:, -2:] if expected.shape[1] > 1 else None
    for row in range(expected.shape[0]):
        if got[row].argmax() != expected[row].argmax():
            gap = float(top2[row, 1] - top2[row, 0]) if top2 is not None else 0.0
            if gap > atol:
                raise MaskforgeError(f"onnxruntime and PyTorch predict different classes for example {row}; "
                                     f"the ONNX file was not written")
    return diff


# --- the compact encoding --------------------------------------------------------------------------------

@dataclass
class CompactStats:
    weights: int = 0          # weight tensors encoded
    elements: int = 0         # weights (masked) in them
    kept: int = 0             # nonzero weights
    encodings: dict | None = None


def compact_weights(proto, *, expect_total: int | None = None, expect_kept: int | None = None) -> CompactStats:
    """Replace (in place) every float32 weight initializer of Conv/Gemm/MatMul by its packed encoding.

    The expansion nodes go first in the graph and read only initializers, so onnxruntime's constant
    folding turns them back into the dense weight at session start. See docs/DEPLOY.md for the format.
    """
    from onnx import TensorProto, numpy_helper

    graph = proto.graph
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    names: list[str] = []
    for node in graph.node:
        if node.op_type in _WEIGHT_OPS and len(node.input) > 1:
            name = node.input[1]
            tensor = initializers.get(name)
            if (tensor is not None and tensor.data_type == TensorProto.FLOAT and len(tensor.dims) >= 2
                    and name not in names):
                names.append(name)
    stats = CompactStats(encodings={})
    new_nodes, new_tensors, replaced = [], [], set()
    for name in names:
        weight = numpy_helper.to_array(initializers[name])
        encoded = _encode_weight(name, weight, len(replaced))
        if encoded is None:
            continue  # an all-zero weight: nothing to gain, keep it dense
        nodes, tensors, encoding = encoded
        replaced.add(name)
        new_nodes += nodes
        new_tensors += tensors
        stats.weights += 1
        stats.elements += weight.size
        stats.kept += int(np.count_nonzero(weight))
        stats.encodings[encoding] = stats.encodings.get(encoding, 0) + 1
    if expect_total is not None and (stats.elements != expect_total or stats.kept != expect_kept):
        raise MaskforgeError(f"compact export found {stats.elements:,} weights ({stats.kept:,} nonzero) in the "
                             f"traced graph, the artifact has {expect_total:,} ({expect_kept:,} kept); this is a "
                             f"maskforge bug, use --dense")
    used = {name for node in new_nodes for name in node.input}
    new_tensors = [tensor for tensor in _shared_constants() if tensor.name in used] + new_tensors
    kept_initializers = [tensor for tensor in graph.initializer if tensor.name not in replaced]
    del graph.initializer[:]
    graph.initializer.extend(kept_initializers + new_tensors)
    old_nodes = list(graph.node)
    del graph.node[:]
    graph.node.extend(new_nodes + old_nodes)
    return stats


_SHIFTS, _TWO, _ONE_I32, _AXIS0, _ZERO_F32, _FLAT, _START = (
    "maskforge/bit_shifts", "maskforge/two_u8", "maskforge/one_i32", "maskforge/axis0", "maskforge/zero_f32",
    "maskforge/flat_shape", "maskforge/start")


def _shared_constants():
    from onnx import numpy_helper

    yield numpy_helper.from_array(np.arange(8, dtype=np.uint8), _SHIFTS)
    yield numpy_helper.from_array(np.array(2, dtype=np.uint8), _TWO)
    yield numpy_helper.from_array(np.array(1, dtype=np.int32), _ONE_I32)
    yield numpy_helper.from_array(np.array(0, dtype=np.int32), _AXIS0)
    yield numpy_helper.from_array(np.array(0.0, dtype=np.float32), _ZERO_F32)
    yield numpy_helper.from_array(np.array([-1], dtype=np.int64), _FLAT)
    yield numpy_helper.from_array(np.array([0], dtype=np.int64), _START)


def _shared_magnitude(weight: np.ndarray, mask: np.ndarray) -> np.ndarray | None:
    """A magnitude array broadcastable to `weight` such that every nonzero |w| equals it, or None.

    Tried in order: one scalar (signed constant without batch norm), one value per output channel
    (axis 0: a convolution with its batch norm folded in), one per column (the last axis).
    """
    magnitude = np.abs(weight)
    candidates = [None, 0, weight.ndim - 1]
    for axis in candidates:
        if axis is None:
            value = magnitude[mask].max()
            if np.all(magnitude[mask] == value):
                return np.array(value, dtype=np.float32)
            continue
        reduce = tuple(a for a in range(weight.ndim) if a != axis)
        group = np.where(mask, magnitude, np.float32(0)).max(axis=reduce, keepdims=True)
        if np.all(np.where(mask, magnitude == group, True)):
            return group.astype(np.float32)
    return None


def _encode_weight(name: str, weight: np.ndarray, index: int):
    """(nodes, initializers, encoding) that rebuild `weight` exactly under the name `name`, or None."""
    from onnx import TensorProto, helper, numpy_helper

    flat = weight.reshape(-1)
    mask = flat != 0
    count, kept = flat.size, int(mask.sum())
    if kept == 0:
        return None
    p = f"{name}/maskforge"   # initializers: named after the weight they rebuild
    q = f"_mf{index}"           # intermediate values: short names (they are stored once per use)
    nodes, tensors = [], []

    def init(suffix: str, array: np.ndarray) -> str:
        tensors.append(numpy_helper.from_array(array, f"{p}/{suffix}"))
        return f"{p}/{suffix}"

    def node(op: str, inputs: list[str], output: str, **attrs) -> str:
        nodes.append(helper.make_node(op, inputs, [output], **attrs))
        return output

    def unpack(bits_name: str, length: int, tag: str) -> str:
        # bytes [B, 1] >> [0..7] -> [B, 8]; mod 2 -> bit j of byte b at position 8b + j (LSB first)
        shifted = node("BitShift", [bits_name, _SHIFTS], f"{q}/{tag}_shifted", direction="RIGHT")
        bits = node("Mod", [shifted, _TWO], f"{q}/{tag}_bits")
        flat_bits = node("Reshape", [bits, _FLAT], f"{q}/{tag}_flat")
        if length % 8:
            flat_bits = node("Slice", [flat_bits, _START, init(f"{tag}_count", np.array([length], dtype=np.int64))],
                             f"{q}/{tag}_cut")
        return node("Cast", [flat_bits], f"{q}/{tag}", to=TensorProto.BOOL)

    def packed(values: np.ndarray) -> np.ndarray:
        return np.packbits(values.astype(np.uint8), bitorder="little").reshape(-1, 1)

    shape = init("shape", np.array(weight.shape, dtype=np.int64))
    mask_flat = unpack(init("mask_packed", packed(mask)), count, "mask")
    magnitude = _shared_magnitude(weight, mask.reshape(weight.shape))
    kept_values = flat[mask]

    def kept_index() -> str:
        # index of each weight among the kept ones: inclusive prefix count of the mask, minus one
        as_int = node("Cast", [mask_flat], f"{q}/mask_i32", to=TensorProto.INT32)
        prefix = node("CumSum", [as_int, _AXIS0], f"{q}/prefix")
        return node("Sub", [prefix, _ONE_I32], f"{q}/kept_index")

    mask_shaped = node("Reshape", [mask_flat, shape], f"{q}/mask_shaped")
    if magnitude is not None and bool(np.all(kept_values > 0)):
        encoding = "magnitude"       # all kept weights positive (unsigned constant)
        node("Where", [mask_shaped, init("magnitude", magnitude), _ZERO_F32], name)
    elif magnitude is not None:
        encoding = "sign"            # signed constant: one sign bit per kept weight
        signs = unpack(init("sign_packed", packed(kept_values > 0)), kept, "sign")
        spread = node("Gather", [signs, kept_index()], f"{q}/sign_all", axis=0)
        spread = node("Reshape", [spread, shape], f"{q}/sign_shaped")
        positive = init("magnitude", magnitude)
        negative = node("Neg", [positive], f"{q}/negative")
        signed = node("Where", [spread, positive, negative], f"{q}/signed")
        node("Where", [mask_shaped, signed, _ZERO_F32], name)
    else:
        encoding = "values"          # any other distribution: the kept float32 values in C order
        values = init("values", kept_values.astype(np.float32))
        spread = node("Gather", [values, kept_index()], f"{q}/values_all", axis=0)
        spread = node("Reshape", [spread, shape], f"{q}/values_shaped")
        node("Where", [mask_shaped, spread, _ZERO_F32], name)
    return nodes, tensors, encoding


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return " ".join(text.splitlines()[0].split()) if text else type(exc).__name__

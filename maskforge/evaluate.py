"""Evaluate a deployed model in onnxruntime: accuracy, latency, sizes, parameters and MACs.

`evaluate(model)` takes an exported ONNX file or an artifact (exported to a temporary folder on the fly,
compact and dense). Preprocessing comes from the ONNX metadata that `export_onnx` writes; an ONNX file
without it needs explicit `mean`, `std` and `size`. The held-out split is streamed through onnxruntime
in batches; for an artifact the materialized PyTorch model sees the same batches, so the two accuracies
can be compared example for example, and its eager latency is measured beside onnxruntime's.

>>> report = evaluate("runs/demo/artifact.onnx", batch_size=64)      # doctest: +SKIP
>>> report["top1"], report["latency_ms"]["64"]["p50"]                 # doctest: +SKIP
(0.912, 3.1)
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn as nn

from .artifact import Artifact, load_artifact
from .data import DataSplits, InputSpec, iterate_batches, load_data, normalize
from .errors import MaskforgeError
from .export import (META_PREFIX, OnnxModelInfo, TORCH_EXPORT_KEY, _first_line, export_onnx, ort_session,
                     read_onnx_metadata)
from .materialize import materialize

SPLITS = {"test": "heldout", "heldout": "heldout", "val": "heldout", "train": "train"}
SPARSITY_NOTE = ("Unstructured sparsity does not speed up dense kernels: onnxruntime and PyTorch run every "
                 "weight, zeros included, so latency follows the dense MACs; the effective MACs are what a "
                 "sparse kernel could skip.")
_WEIGHT_OPS = ("Conv", "Gemm", "MatMul")
_SETTLE_S = 0.3   # pause before a timing block: lets the other runtime's spinning threads go to sleep


@dataclass
class _Model:
    """What evaluation needs to know about the model under test."""

    onnx_path: Path | None      # for an artifact: set once it is exported
    spec: InputSpec             # preprocessing; class_names are placeholders unless names_known
    names_known: bool
    info: OnnxModelInfo
    artifact: Artifact | None = None
    torch_model: nn.Module | None = None
    compact_bytes: int | None = None
    dense_bytes: int | None = None


def evaluate(model: str | os.PathLike, *, data: str | None = None, split: str = "test", batch_size: int = 64,
             threads: int | None = None, mean: Sequence[float] | str | None = None,
             std: Sequence[float] | str | None = None, size: int | None = None, latency: bool = True,
             latency_runs: int = 30, warmup: int = 3, latency_budget_s: float = 10.0,
             progress: Callable[[int, int], None] | None = None) -> dict:
    """Stream `split` of `data` through onnxruntime and return the report (a JSON-able dict).

    `model` is an `.onnx` file or an artifact. `data` defaults to the data set named in the model's
    provenance, else the built-in `mnist5k`. `threads` sets onnxruntime's and PyTorch's intra-op threads
    (default: all cores). `progress(done, total)` is called after each batch.
    """
    path = Path(model)
    if split not in SPLITS:
        raise MaskforgeError(f"unknown split {split!r}; choose test (the held-out split) or train")
    if not (isinstance(batch_size, int) and batch_size >= 1):
        raise MaskforgeError(f"batch size must be a positive integer, got {batch_size!r}")
    if threads is not None and threads < 1:
        raise MaskforgeError(f"threads must be at least 1, got {threads}")
    threads = threads or os.cpu_count() or 1
    overrides = _overrides(mean, std, size)
    subject = _open_model(path, overrides)
    splits, source = _load_matching_data(subject, data)  # before any export: mismatches fail fast
    dataset = getattr(splits, SPLITS[split])
    if len(dataset) == 0:
        raise MaskforgeError(f"the {split} split of {source} is empty")
    with tempfile.TemporaryDirectory(prefix="maskforge-eval-") as workdir:
        if subject.artifact is not None:
            _export_artifact(subject, Path(workdir), threads)
        spec = subject.spec
        session = ort_session(subject.onnx_path, threads=threads)
        input_name = session.get_inputs()[0].name
        with _torch_threads(threads):
            accuracy = _accuracy(session, input_name, subject.torch_model, dataset, spec, batch_size, progress)
            timings = (_latency(session, input_name, subject.torch_model, dataset, spec, batch_size, latency_runs,
                                warmup, latency_budget_s) if latency else {})
        report = _report(subject, path, source, split, accuracy, timings, batch_size, threads)
    return report


# --- the model -------------------------------------------------------------------------------------------

def _overrides(mean, std, size) -> dict:
    out = {}
    if mean is not None:
        out["mean"] = parse_floats(mean, "mean")
    if std is not None:
        out["std"] = parse_floats(std, "std")
    if size is not None:
        if not (isinstance(size, int) and size >= 1):
            raise MaskforgeError(f"size must be a positive integer, got {size!r}")
        out["size"] = size
    return out


def parse_floats(value: Sequence[float] | str, name: str) -> tuple[float, ...]:
    """`"0.485,0.456,0.406"` or a sequence -> a tuple of floats (for --mean / --std)."""
    try:
        items = value.split(",") if isinstance(value, str) else list(value)
        numbers = tuple(float(item) for item in items)
    except (TypeError, ValueError):
        raise MaskforgeError(f"--{name} must be comma-separated numbers, one per channel, got {value!r}") from None
    if not numbers or not all(math.isfinite(v) for v in numbers):
        raise MaskforgeError(f"--{name} must be finite numbers, got {value!r}")
    return numbers


def _sniff(path: Path) -> str:
    """'artifact' (a safetensors file) or 'onnx' (anything else, checked when loaded)."""
    if not path.exists():
        raise MaskforgeError(f"model {path} does not exist")
    if path.is_dir():
        raise MaskforgeError(f"model {path} is a folder; give an .onnx file or an artifact")
    try:
        with open(path, "rb") as handle:
            head = handle.read(16)
    except OSError as exc:
        raise MaskforgeError(f"cannot read {path}: {exc.strerror or exc}") from None
    if len(head) > 8 and head[8:9] == b"{":
        return "artifact"
    return "onnx"


def _open_model(path: Path, overrides: dict) -> _Model:
    if _sniff(path) == "artifact":
        return _open_artifact(path, overrides)
    return _open_onnx(path, overrides)


def _open_artifact(path: Path, overrides: dict) -> _Model:
    try:
        artifact = load_artifact(path)
    except MaskforgeError as exc:
        if _is_torch_export(path):
            raise MaskforgeError(f"{path} is a PyTorch export; evaluate the artifact or an ONNX export "
                                 f"instead") from None
        raise exc
    spec = _apply_overrides(artifact.spec, overrides)
    return _Model(None, spec, True, OnnxModelInfo(None, None, {}), artifact)


def _export_artifact(subject: _Model, workdir: Path, threads: int) -> None:
    """Materialize the artifact and export it compact (evaluated) and dense (for its size)."""
    import onnx

    artifact = subject.artifact
    subject.torch_model = materialize(artifact, threads=threads)
    compact = export_onnx(artifact, workdir / "compact.onnx", compact=True, model=subject.torch_model)
    dense = export_onnx(artifact, workdir / "dense.onnx", compact=False, model=subject.torch_model, check=False)
    subject.onnx_path, subject.compact_bytes, subject.dense_bytes = compact.path, compact.file_bytes, dense.file_bytes
    subject.info = read_onnx_metadata(onnx.load(str(compact.path), load_external_data=False))


def _is_torch_export(path: Path) -> bool:
    with contextlib.suppress(Exception):
        from safetensors import safe_open

        with safe_open(str(path), framework="np") as handle:
            return TORCH_EXPORT_KEY in (handle.metadata() or {})
    return False


def _load_onnx(path: Path):
    import onnx

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - protobuf's DecodeError and friends
        raise MaskforgeError(f"{path} is not a readable ONNX model (truncated or not ONNX: "
                             f"{_first_line(exc)})") from None
    from .verify import check_onnx_external_data

    # Before onnxruntime opens it: refuse external-data locations outside the model's folder.
    check_onnx_external_data(proto, path.parent if str(path.parent) else Path("."))
    if not proto.graph.node or not proto.graph.input or not proto.graph.output:
        raise MaskforgeError(f"{path} is not a usable ONNX model (empty graph: truncated or not ONNX)")
    try:
        onnx.checker.check_model(proto)
    except Exception as exc:  # noqa: BLE001 - ValidationError, or protobuf errors on odd files
        raise MaskforgeError(f"{path} is not a valid ONNX model ({_first_line(exc)})") from None
    return proto


def _open_onnx(path: Path, overrides: dict) -> _Model:
    proto = _load_onnx(path)
    info = read_onnx_metadata(proto)
    if info.spec is not None:
        spec = _apply_overrides(info.spec, overrides)
        return _Model(path, spec, True, info, compact_bytes=_size_if(info.layout == "compact", path),
                      dense_bytes=_size_if(info.layout == "dense", path))
    missing = [f"--{name}" for name in ("mean", "std", "size") if name not in overrides]
    if missing:
        raise MaskforgeError(f"{path} has no maskforge metadata, so its preprocessing is unknown; pass "
                             f"{', '.join(missing)} (e.g. --mean 0.1307 --std 0.3081 --size 28)")
    dims = _graph_dims(proto.graph.input[0])
    channels = dims[1] if len(dims) == 4 and isinstance(dims[1], int) and dims[1] > 0 else len(overrides["mean"])
    outputs = _graph_dims(proto.graph.output[0])
    classes = outputs[-1] if outputs and isinstance(outputs[-1], int) and outputs[-1] > 0 else 1
    try:
        spec = InputSpec(channels, overrides["size"], overrides["size"], overrides["mean"], overrides["std"],
                         tuple(str(i) for i in range(classes)))
    except MaskforgeError as exc:
        raise MaskforgeError(f"{path}: {exc} (the model takes {channels} channel(s))") from None
    layout = "dense" if _all_weights_constant(proto) else None
    return _Model(path, spec, False, info, dense_bytes=_size_if(layout == "dense", path))


def _size_if(condition: bool, path: Path) -> int | None:
    return path.stat().st_size if condition else None


def _apply_overrides(spec: InputSpec, overrides: dict) -> InputSpec:
    if not overrides:
        return spec
    size = overrides.get("size")
    try:
        return InputSpec(spec.channels, size or spec.height, size or spec.width, overrides.get("mean", spec.mean),
                         overrides.get("std", spec.std), spec.class_names)
    except MaskforgeError as exc:
        raise MaskforgeError(f"bad preprocessing override: {exc}") from None


def _graph_dims(value_info) -> list:
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
            for d in value_info.type.tensor_type.shape.dim]


def _all_weights_constant(proto) -> bool:
    initializers = {t.name for t in proto.graph.initializer}
    return all(node.input[1] in initializers for node in proto.graph.node
               if node.op_type in _WEIGHT_OPS and len(node.input) > 1)


# --- the data --------------------------------------------------------------------------------------------

def _load_matching_data(subject: _Model, data: str | None) -> tuple[DataSplits, str]:
    spec = subject.spec
    source = data or _provenance_data(subject) or "mnist5k"
    splits = load_data(source)
    if splits.kind == "imagefolder" and (splits.spec.height, splits.spec.width) != (spec.height, spec.width):
        if spec.height != spec.width:
            raise MaskforgeError(f"the model takes {spec.height}x{spec.width} images; image folders are resized "
                                 f"to squares only")
        splits = load_data(source, image_size=spec.height)
    got = splits.spec
    if got.channels != spec.channels:
        raise MaskforgeError(f"data {source} has {got.channels}-channel images, the model takes {spec.channels}")
    if (got.height, got.width) != (spec.height, spec.width):
        raise MaskforgeError(f"data {source} has {got.height}x{got.width} images, the model takes "
                             f"{spec.height}x{spec.width}")
    if got.num_classes != spec.num_classes:
        raise MaskforgeError(f"data {source} has {got.num_classes} classes, the model predicts {spec.num_classes}")
    if subject.names_known and tuple(got.class_names) != tuple(spec.class_names):
        raise MaskforgeError(f"data {source} has classes {_names(got.class_names)}, the model was searched on "
                             f"{_names(spec.class_names)}")
    return splits, source


def _names(names: Sequence[str]) -> str:
    return ", ".join(names[:6]) + (" ..." if len(names) > 6 else "")


def _provenance_data(subject: _Model) -> str | None:
    if subject.artifact is not None:
        provenance = subject.artifact.document.get("provenance", {})
    else:
        provenance = subject.info.get_json("provenance", {}) or {}
    source = provenance.get("data") if isinstance(provenance, dict) else None
    if not source:
        return None
    if source != "mnist5k" and not Path(source).expanduser().exists():
        raise MaskforgeError(f"the model was searched on {source}, which is not on this machine; pass --data")
    return source


# --- measuring -------------------------------------------------------------------------------------------

@contextlib.contextmanager
def _torch_threads(threads: int):
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _accuracy(session, input_name: str, torch_model: nn.Module | None, dataset, spec: InputSpec, batch_size: int,
              progress) -> dict:
    total = len(dataset)
    topk = min(5, spec.num_classes)
    counts = {"examples": 0, "correct": 0, "correct_top5": 0, "torch_correct": 0, "agree": 0}
    max_diff = 0.0
    for images, labels in iterate_batches(dataset, batch_size, shuffle=False):
        x = normalize(images, spec)
        logits = session.run(None, {input_name: x.numpy()})[0]
        if logits.ndim != 2 or logits.shape[1] != spec.num_classes:
            raise MaskforgeError(f"the model's output has shape {list(logits.shape)}, expected "
                                 f"[batch, {spec.num_classes}]")
        y = labels.numpy()
        top = np.argsort(-logits, axis=1, kind="stable")[:, :topk]
        counts["examples"] += len(y)
        counts["correct"] += int((top[:, 0] == y).sum())
        counts["correct_top5"] += int((top == y[:, None]).any(axis=1).sum())
        if torch_model is not None:
            with torch.no_grad():
                reference = torch_model(x).numpy()
            counts["torch_correct"] += int((reference.argmax(1) == y).sum())
            counts["agree"] += int((reference.argmax(1) == top[:, 0]).sum())
            max_diff = max(max_diff, float(np.abs(reference - logits).max()))
        if progress is not None:
            progress(counts["examples"], total)
    counts["topk"] = topk
    counts["max_abs_diff"] = max_diff if torch_model is not None else None
    return counts


def _latency(session, input_name: str, torch_model: nn.Module | None, dataset, spec: InputSpec, batch_size: int,
             runs: int, warmup: int, budget_s: float) -> dict:
    """Per batch size: onnxruntime (and PyTorch eager) seconds per run, interleaved so load hits both alike."""
    images, _ = next(iter(iterate_batches(dataset, batch_size, shuffle=False)))
    if len(images) < batch_size:  # a split smaller than the batch: repeat it
        images = images.repeat((batch_size + len(images) - 1) // len(images), 1, 1, 1)[:batch_size]
    full = normalize(images, spec)
    out = {}
    for size in sorted({1, batch_size}):
        x = full[:size].contiguous()
        x_np = x.numpy()
        fns = {"ort": lambda x_np=x_np: session.run(None, {input_name: x_np})}
        if torch_model is not None:
            def eager(x=x):
                with torch.no_grad():
                    return torch_model(x)
            fns["torch"] = eager
        out[size] = time_calls(fns, runs, warmup, budget_s)
    return out


def time_calls(fns: dict, runs: int, warmup: int, budget_s: float, rounds: int = 2) -> dict[str, list[float]]:
    """Seconds per call of each function: `rounds` alternating blocks per function, each after warm-up.

    Blocks, not call-by-call interleaving: onnxruntime's and PyTorch's (OpenMP) worker threads keep
    spinning for a moment after a call and would steal the cores from the other runtime's next call, so
    each block starts after a short pause. Alternating blocks still spreads a varying background load
    over both. Each block stops early once it has used its share of `budget_s` (and at least 3 calls).
    """
    times: dict[str, list[float]] = {name: [] for name in fns}
    per_block = max(1, -(-max(1, runs) // rounds))
    block_budget = budget_s / (rounds * len(fns))
    for round_index in range(rounds):
        for name, fn in fns.items():
            if len(fns) > 1:
                time.sleep(_SETTLE_S)
            for _ in range(max(1, warmup) if round_index == 0 else 1):
                fn()
            started = time.perf_counter()
            for index in range(per_block):
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
                if index + 1 >= 3 and time.perf_counter() - started > block_budget:
                    break
    return times


def _stats(seconds: list[float], batch: int) -> tuple[dict, float]:
    ms = np.asarray(seconds) * 1000.0
    p50, p90, p99 = (float(v) for v in np.percentile(ms, [50, 90, 99]))
    return ({"p50": p50, "p90": p90, "p99": p99, "mean": float(ms.mean()), "runs": int(ms.size)},
            batch * 1000.0 / p50)


# --- the report -------------------------------------------------------------------------------------------

def _report(subject: _Model, path: Path, source: str, split: str, accuracy: dict, timings: dict, batch_size: int,
            threads: int) -> dict:
    info, artifact = subject.info, subject.artifact
    examples = accuracy["examples"]
    report: dict = {
        "model": str(path), "model_kind": "artifact" if artifact else "onnx",
        "onnx_format": info.layout, "arch": artifact.arch if artifact else info.metadata.get(META_PREFIX + "arch"),
        "k": artifact.k if artifact else _float(info.metadata.get(META_PREFIX + "k")),
        "data": source, "split": split, "examples": examples,
        "top1": accuracy["correct"] / examples, "top5": accuracy["correct_top5"] / examples,
        "correct": accuracy["correct"], "correct_top5": accuracy["correct_top5"], "top5_k": accuracy["topk"],
        "batch_size": batch_size, "threads": threads,
    }
    if subject.torch_model is not None:
        report.update(torch_top1=accuracy["torch_correct"] / examples, torch_correct=accuracy["torch_correct"],
                      argmax_agreement=accuracy["agree"] / examples, max_abs_diff_vs_torch=accuracy["max_abs_diff"])
    provenance = artifact.document.get("provenance", {}) if artifact else (info.get_json("provenance", {}) or {})
    if split in ("test", "heldout", "val") and provenance.get("data") == source:
        report["search_heldout_acc"] = provenance.get("heldout_acc")
    if timings:
        report["latency_ms"], report["images_per_s"] = {}, {}
        if subject.torch_model is not None:
            report["torch_latency_ms"], report["torch_images_per_s"], report["ort_vs_torch"] = {}, {}, {}
        for size, runs in timings.items():
            key = str(size)
            report["latency_ms"][key], report["images_per_s"][key] = _stats(runs["ort"], size)
            if "torch" in runs:
                report["torch_latency_ms"][key], report["torch_images_per_s"][key] = _stats(runs["torch"], size)
                report["ort_vs_torch"][key] = report["images_per_s"][key] / report["torch_images_per_s"][key]
    report.update(_sizes(subject, path))
    report.update(_compute(subject))
    return report


def _float(value) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _sizes(subject: _Model, path: Path) -> dict:
    info, artifact = subject.info, subject.artifact
    masked = artifact.masked_weights if artifact else info.get_int("masked_weights")
    bn_values = (sum(s.numel() for s in artifact.bn_stats.values()) if artifact else info.get_int("bn_values"))
    artifact_bytes = artifact.file_bytes if artifact else info.get_int("artifact_bytes")
    onnx_bytes = subject.onnx_path.stat().st_size
    dense_f32 = 4 * (masked + (bn_values or 0)) if masked else None
    sizes = {
        "onnx_bytes": onnx_bytes, "onnx_compact_bytes": subject.compact_bytes, "onnx_dense_bytes": subject.dense_bytes,
        "artifact_bytes": artifact_bytes, "dense_float32_bytes": dense_f32,
        "artifact_bits_per_weight": 8 * artifact_bytes / masked if artifact_bytes and masked else None,
        "onnx_bits_per_weight": 8 * onnx_bytes / masked if masked else None,
    }

    def ratio(a, b):
        return a / b if a and b else None

    sizes["ratios"] = {"dense_float32_over_artifact": ratio(dense_f32, artifact_bytes),
                       "dense_float32_over_onnx_compact": ratio(dense_f32, subject.compact_bytes),
                       "onnx_dense_over_onnx_compact": ratio(subject.dense_bytes, subject.compact_bytes)}
    return sizes


def _compute(subject: _Model) -> dict:
    """Parameters (total and kept) and MACs per example (dense, and x density), from the ONNX graph."""
    import onnx

    proto = onnx.load(str(subject.onnx_path), load_external_data=False)
    info, artifact = subject.info, subject.artifact
    total = artifact.masked_weights if artifact else info.get_int("masked_weights")
    kept = artifact.kept_weights if artifact else info.get_int("kept_weights")
    if total is None and _all_weights_constant(proto):
        from onnx import numpy_helper

        weights = _weight_initializers(proto)
        arrays = [numpy_helper.to_array(t) for t in weights]
        total, kept = sum(a.size for a in arrays), sum(int(np.count_nonzero(a)) for a in arrays)
    macs = _macs(proto)
    density = kept / total if total and kept is not None else None
    return {"params_total": total, "params_kept": kept, "density": density, "macs_dense": macs,
            "macs_effective": int(round(macs * density)) if macs is not None and density is not None else None,
            "sparsity_note": SPARSITY_NOTE}


def _weight_initializers(proto) -> list:
    initializers = {t.name: t for t in proto.graph.initializer}
    names = []
    for node in proto.graph.node:
        if node.op_type in _WEIGHT_OPS and len(node.input) > 1 and node.input[1] in initializers:
            if node.input[1] not in names:
                names.append(node.input[1])
    return [initializers[name] for name in names]


def _macs(proto) -> int | None:
    """Multiply-accumulates per example of Conv/Gemm/MatMul, from ONNX shape inference (None if unknown)."""
    import onnx

    try:
        inferred = onnx.shape_inference.infer_shapes(proto)
    except Exception:  # noqa: BLE001 - shape inference is best effort
        return None
    shapes = {t.name: list(t.dims) for t in proto.graph.initializer}
    for value in list(inferred.graph.value_info) + list(inferred.graph.output) + list(inferred.graph.input):
        shapes.setdefault(value.name, _graph_dims(value))
    total = 0
    for node in proto.graph.node:
        if node.op_type not in _WEIGHT_OPS or len(node.input) < 2:
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


def write_report(report: dict, path: str | os.PathLike) -> Path:
    """Write the report as JSON, atomically."""
    import json

    from .export import check_output_path
    from .fileio import atomic_write

    path = check_output_path(path)
    return atomic_write(path, json.dumps(report, indent=2, sort_keys=True) + "\n")

"""The export choices (storage x precision x opset), checked before any work, and the files they name.

* storage: `dense` (float32 or int8 initializers), `compact` (packed mask + sign bits, ~1 + k bits per
  weight), `regen` (mask bits + one stream key per layer: the graph regenerates the weights, ~1 bit).
* precision: `fp32` (exact: the artifact's network) or `int8` (QDQ; exact weights, calibrated
  activations, 2.7-4x the fp32 throughput on onnxruntime's CPU kernels: BENCHMARKS.md §7).

The default (storage None) is `regen` where the artifact's distribution and the opset allow it, else
`compact`: the smallest exact file, and onnxruntime folds it into the dense graph at session start, so
it runs at the dense file's speed (docs/DEPLOY.md has the measurements).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..artifact import Artifact
from ..errors import MaskforgeError
from ..exportchoices import DEFAULT_OPSET, MAX_OPSET, MIN_OPSET, PRECISIONS, STORAGES, check_choices
from . import regen_graph

__all__ = ["DEFAULT_OPSET", "MAX_OPSET", "MIN_OPSET", "PRECISIONS", "STORAGES", "EXPORT_MODES", "ExportMode"]
EXACT_INT8 = ("signed_constant", "unsigned_constant")  # c_j x {-1, 0, +1} per channel after BN folding


@dataclass(frozen=True)
class ExportMode:
    """One export mode: a storage and a precision (and an ONNX opset, None for the default).

    `resolve_mode` checks a mode against an artifact and returns it completed (opset filled in, `lossy`
    set); `EXPORT_MODES` lists the six storage x precision combinations, the rows of `eval --compare`.
    """

    storage: str
    precision: str = "fp32"
    opset: int | None = None
    lossy: bool = False  # int8 of weights int8 cannot hold exactly (allowed only when asked)

    @property
    def name(self) -> str:
        """ "regen int8"; the opset is named only when it is not the default."""
        opset = f" opset {self.opset}" if self.opset not in (None, DEFAULT_OPSET) else ""
        return f"{self.storage} {self.precision}{opset}"


# Every storage x precision, in the order tables list them: the exact (fp32) files first, dense fp32 (the
# plain file, the baseline of speed ratios) leading.
EXPORT_MODES = tuple(ExportMode(storage, precision) for precision in PRECISIONS for storage in STORAGES)


def resolve_mode(
    artifact: Artifact,
    storage: str | None = None,
    precision: str = "fp32",
    opset: int | None = None,
    *,
    allow_lossy: bool = False,
) -> ExportMode:
    """Check the choices against each other and the artifact; raise one clear `MaskforgeError` if they clash."""
    opset = check_choices(storage, precision, opset)
    regen_ok = artifact.init in regen_graph.DISTRIBUTIONS
    if storage is None:
        storage = "regen" if regen_ok and opset >= regen_graph.MIN_OPSET else "compact"
    if storage == "regen" and not regen_ok:
        raise MaskforgeError(regen_graph.refusal(artifact.init))
    if storage == "regen" and opset < regen_graph.MIN_OPSET:
        raise MaskforgeError(
            f"storage 'regen' needs opset {regen_graph.MIN_OPSET} or later (BitwiseXor, "
            f"BitwiseAnd), got opset {opset}; use opset {regen_graph.MIN_OPSET} to {MAX_OPSET}, "
            f"or storage 'compact', which works from opset {MIN_OPSET}"
        )
    lossy = precision == "int8" and artifact.init not in EXACT_INT8
    if lossy and not allow_lossy:
        raise MaskforgeError(
            f"precision 'int8' of {artifact.init} weights is lossy (they are not c x {{-1, 0, +1}} "
            f"per output channel); pass --allow-lossy (allow_lossy=True) to export anyway (7-bit weights, checked "
            f"against fp32 top-1 on held-out data), or use precision 'fp32'"
        )
    return ExportMode(storage, precision, opset, lossy)


def default_export_path(
    artifact_path: str | os.PathLike | None, fmt: str = "onnx", *, storage: str | None = None, precision: str = "fp32"
) -> Path:
    """The file an export writes next to its artifact, one name per mode.

    `runs/x/artifact.safetensors` -> `artifact.onnx` (regen fp32, the default), `artifact.compact.onnx`,
    `artifact.dense.onnx`, `artifact.int8.onnx` (regen int8), `artifact.compact.int8.onnx`,
    `artifact.dense.int8.onnx`, `artifact.torch.safetensors`.
    """
    base = Path(artifact_path) if artifact_path is not None else Path("model.safetensors")
    stem = base.name[: -len(".safetensors")] if base.name.endswith(".safetensors") else base.stem
    if fmt == "torch":
        return base.with_name(stem + ".torch.safetensors")
    parts = [stem] + ([storage] if storage not in (None, "regen") else []) + (["int8"] if precision == "int8" else [])
    return base.with_name(".".join(parts) + ".onnx")

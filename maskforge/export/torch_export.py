"""The PyTorch export: the materialized network's state dict as `.safetensors`, plus the JSON that
rebuilds it (`load_torch_export`). Needs maskforge for the architecture code, nothing else.

Merge note: once the shared safetensors "container" module exists (header + document + digests for
artifacts and checkpoints), this file should write and read through it.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch
import torch.nn as nn

from .. import __version__
from ..artifact import Artifact
from ..errors import MaskforgeError, first_line
from ..jsonread import strict_json
from ..fileio import atomic_path
from ..materialization import as_artifact, materialize, plain_structure
from .metadata import with_digest
from ..sizes import bits_per_weight
from .destination import check_output_path, output_folder
from .modes import default_export_path
from .onnx_export import ExportResult
from .parity import parity_inputs

TORCH_EXPORT_KEY = "maskforge_torch_export"
TORCH_EXPORT_FORMAT = "maskforge-torch-export"


def export_torch(
    artifact: Artifact | str | os.PathLike,
    out: str | os.PathLike | None = None,
    *,
    threads: int | None = None,
    model: nn.Module | None = None,
) -> ExportResult:
    """Write the materialized network's state dict as `.safetensors` plus the JSON needed to rebuild it.

    The file is reloaded and must give bit-identical outputs before it is kept.

    >>> result = export_torch("runs/demo/artifact.safetensors")          # doctest: +SKIP
    >>> model = load_torch_export(result.path)                           # doctest: +SKIP
    """
    from safetensors.torch import save_file

    started = time.perf_counter()
    artifact = with_digest(as_artifact(artifact))
    out = Path(out) if out is not None else default_export_path(artifact.path, "torch")
    check_output_path(out)
    if model is None:
        model = materialize(artifact, threads=threads)
    document = {
        "format": TORCH_EXPORT_FORMAT,
        "format_version": 1,
        "maskforge_version": __version__,
        "arch": {"name": artifact.arch, "args": artifact.arch_args},
        "k": artifact.k,
        "seed": artifact.seed,
        "init": {"distribution": artifact.init, "scale_fan": artifact.scale_fan},
        "input": artifact.spec.to_dict(),
        "artifact_digest": artifact.digest,
        "layers": "plain bias-free Conv2d/Linear holding weight*mask; non-affine BatchNorm2d with running stats",
    }
    state = {name: tensor.detach().contiguous() for name, tensor in model.state_dict().items()}
    with output_folder(out), atomic_path(out) as tmp:
        save_file(state, str(tmp), metadata={TORCH_EXPORT_KEY: json.dumps(document, sort_keys=True)})
        reloaded = load_torch_export(tmp)
        x = parity_inputs(artifact.spec)
        with torch.no_grad():
            diff = float((reloaded(x) - model(x)).abs().max())
        if diff != 0.0:
            raise MaskforgeError(
                f"the reloaded torch export differs from the materialized model (max abs diff "
                f"{diff:.3g}); nothing was written"
            )
    size = out.stat().st_size
    return ExportResult(
        path=out,
        format="torch",
        file_bytes=size,
        masked_weights=artifact.masked_weights,
        kept_weights=artifact.kept_weights,
        bits_per_weight=bits_per_weight(size, artifact.masked_weights),
        seconds=time.perf_counter() - started,
        max_abs_diff=diff,
        parity_tolerance=0.0,
    )


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
        raise MaskforgeError(f"{path} is not a safetensors file ({first_line(exc)})") from None
    if TORCH_EXPORT_KEY not in metadata:
        raise MaskforgeError(f"{path} is not a maskforge torch export (no '{TORCH_EXPORT_KEY}' metadata)")
    try:
        document = strict_json(metadata[TORCH_EXPORT_KEY], "metadata", "the JSON")
        arch, args, k = document["arch"]["name"], document["arch"]["args"], document["k"]
        if not (
            isinstance(arch, str)
            and isinstance(args, dict)
            and isinstance(k, (int, float))
            and not isinstance(k, bool)
            and 0.0 < k <= 1.0
        ):
            raise TypeError("bad arch, args or k")
    except (ValueError, KeyError, TypeError, MaskforgeError) as exc:
        raise MaskforgeError(f"{path}: damaged maskforge torch-export metadata ({first_line(exc)})") from None
    model = plain_structure(arch, args, float(k))
    model.to_empty(device="cpu")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise MaskforgeError(f"{path}: state dict does not match architecture {arch} ({first_line(exc)})") from None
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model.eval()

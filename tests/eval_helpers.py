"""Builders shared by the eval, compare and predict tests (pytest puts this folder on sys.path)."""

from __future__ import annotations

from pathlib import Path

from maskforge.export import export_onnx
from maskforge.search import SearchConfig, search


def searched_fc(out: Path, steps: int = 10) -> Path:
    """A short real search of the MLP on the demo data (about a second) into `out`, with its compact
    (`model.onnx`) and dense (`model.dense.onnx`) ONNX exports beside `artifact.safetensors`."""
    result = search(SearchConfig(arch="fc", k=0.5, epochs=1, max_steps=steps, batch_size=128, out=str(out)),
                    progress=False)
    export_onnx(result.artifact_path, out / "model.onnx", compact=True)
    export_onnx(result.artifact_path, out / "model.dense.onnx", compact=False)
    return out

"""`maskforge export`: an artifact -> ONNX (compact or dense) or a PyTorch safetensors state dict."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from maskforge.errors import MaskforgeError
from maskforge.export import DEFAULT_OPSET, export_onnx, export_torch

from .app import app


@app.command("export")
def export_command(
    artifact: Annotated[Path, typer.Argument(help="An artifact.safetensors written by `maskforge search`.")],
    fmt: Annotated[str, typer.Option("--format", help="onnx (for onnxruntime and other runtimes) or torch "
                                                      "(a .safetensors state dict for PyTorch).")] = "onnx",
    compact: Annotated[bool, typer.Option("--compact/--dense",
                                          help="ONNX only: store packed mask and sign bits that onnxruntime "
                                               "expands at session start (about 1 + k bits per weight), or "
                                               "plain float32 weights.")] = True,
    opset: Annotated[int, typer.Option(help="ONNX opset version (13 to 20).")] = DEFAULT_OPSET,
    out: Annotated[Optional[Path], typer.Option(help="Output file (default: next to the artifact, "
                                                     "artifact.onnx / artifact.dense.onnx / "
                                                     "artifact.torch.safetensors).")] = None,
    threads: Annotated[Optional[int], typer.Option(help="Threads for regenerating the weights.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of text.")] = False,
) -> None:
    """Materialize an artifact and export it; the file is checked in onnxruntime against PyTorch before it is kept.

    Example: maskforge export runs/conv4/artifact.safetensors --compact --out conv4.onnx
    """
    if fmt == "onnx":
        result = export_onnx(artifact, out, compact=compact, opset=opset, threads=threads)
    elif fmt == "torch":
        result = export_torch(artifact, out, threads=threads)
    else:
        raise MaskforgeError(f"unknown --format {fmt!r}; choose onnx or torch")
    if as_json:
        typer.echo(json.dumps(result.to_dict(), indent=2))
        return
    kind = f"ONNX ({result.layout}, opset {result.opset})" if result.format == "onnx" else "PyTorch state dict"
    check = ("onnxruntime vs PyTorch" if result.format == "onnx" else "reloaded vs materialized")
    Console().print(f"[bold green]wrote[/] {result.path}: {kind}, {result.file_bytes:,} bytes = "
                    f"{result.bits_per_weight:.3f} bits per masked weight ({result.masked_weights:,} weights, "
                    f"{result.kept_weights:,} kept); {check}: max abs diff {result.max_abs_diff:.2g}")

"""`maskforge export`: an artifact -> ONNX (storage x precision) or a PyTorch safetensors state dict."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.text import Text

from maskforge.errors import MaskforgeError
from maskforge.exportchoices import (
    DEFAULT_CALIBRATION,
    DEFAULT_OPSET,
    FORMATS,
    MAX_OPSET,
    MIN_OPSET,
    check_choices,
)
from maskforge.textguard import printable

from .app import app
from .console import console
from .file_hints import require_artifact
from .shown import cell


@app.command("export")
def export_command(
    artifact: Annotated[Path, typer.Argument(help="An artifact.safetensors written by `maskforge search`.")],
    storage: Annotated[
        Optional[str],
        typer.Option(
            help="ONNX weight storage: regen (the graph regenerates the weights from the seed: ~1 bit per "
            "weight), compact (packed mask and sign bits: ~1 + k bits), or dense (plain tensors). "
            "Default: regen, or compact where regen cannot apply (kaiming_normal, opset < 18)."
        ),
    ] = None,
    precision: Annotated[
        str,
        typer.Option(
            help="fp32 (exact) or int8 (QDQ: exact weights, activations calibrated on training images; in "
            "onnxruntime 2.7-4x the fp32 throughput on a 2-core CPU with VNNI, 1.6-1.9x with AVX2 alone: "
            "README.md, Results)."
        ),
    ] = "fp32",
    calibration: Annotated[
        int, typer.Option(help="int8: training images to calibrate the activation ranges on.")
    ] = DEFAULT_CALIBRATION,
    data: Annotated[
        Optional[str],
        typer.Option(
            help="int8: data to calibrate and check on (any `maskforge search --data` source; default: the "
            "artifact's own data)."
        ),
    ] = None,
    allow_lossy: Annotated[
        bool,
        typer.Option(
            "--allow-lossy",
            help="int8 of kaiming_normal weights, which int8 cannot hold exactly (still checked "
            "against fp32 top-1 on held-out data).",
        ),
    ] = False,
    fmt: Annotated[
        str,
        typer.Option(
            "--format",
            help="onnx (for onnxruntime and other runtimes) or torch (a .safetensors state dict for PyTorch).",
        ),
    ] = "onnx",
    opset: Annotated[
        Optional[int],
        typer.Option(
            help=f"ONNX opset version ({MIN_OPSET} to {MAX_OPSET}; default {DEFAULT_OPSET}; regen needs 18 or later)."
        ),
    ] = None,
    out: Annotated[
        Optional[Path],
        typer.Option(
            help="Output file (default: next to the artifact: artifact.onnx for regen fp32, "
            "artifact.<storage>[.int8].onnx otherwise, artifact.torch.safetensors). Missing folders are "
            "created."
        ),
    ] = None,
    threads: Annotated[Optional[int], typer.Option(help="Threads for regenerating the weights.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of text.")] = False,
) -> None:
    """Materialize an artifact and export it; every file is checked in onnxruntime before it is kept.

    fp32 files are compared with PyTorch; int8 files with the same graph run in float, kernel by kernel
    on the same inputs (each quantized tensor within 2 steps: docs/DEPLOY.md), and with fp32 top-1 on
    held-out images. Graphs with a transformer's softmax or norms quantize their weight operators only,
    the first (which reads the image) staying float.

    Examples:
      maskforge export runs/conv4/artifact.safetensors                    # -> runs/conv4/artifact.onnx
      maskforge export runs/conv4/artifact.safetensors --precision int8   # -> artifact.int8.onnx
      maskforge export runs/conv4/artifact.safetensors --storage dense --out conv4.onnx
    """
    # usage errors first, before torch loads (about half a second instead of several)
    if fmt not in FORMATS:
        raise MaskforgeError(f"unknown --format {fmt!r}; choose {' or '.join(FORMATS)}")
    if fmt == "onnx":
        check_choices(storage, precision, opset)
    elif storage is not None or precision != "fp32":
        raise MaskforgeError("--storage and --precision apply to --format onnx only")
    require_artifact(artifact)
    from maskforge.export import Int8Options, export_onnx, export_torch  # torch loads here

    if fmt == "onnx":
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", UserWarning)
            result = export_onnx(
                artifact,
                out,
                storage=storage,
                precision=precision,
                opset=opset,
                allow_lossy=allow_lossy,
                int8=Int8Options(calibration=calibration, data=data),
                threads=threads,
            )
        for warning in caught:
            typer.echo(f"warning: {printable(warning.message)}", err=True)
    else:
        result = export_torch(artifact, out, threads=threads)
    if as_json:
        typer.echo(json.dumps(result.to_dict(), indent=2))
        return
    # the path is the user's and may hold "[...]": never read as markup
    console().print(Text.assemble(("wrote", "bold green"), " ", cell(f"{result.path}: {_describe(result)}")))


def _describe(result) -> str:
    size = (
        f"{result.file_bytes:,} bytes = {result.bits_per_weight:.3f} bits per masked weight "
        f"({result.masked_weights:,} weights, {result.kept_weights:,} kept)"
    )
    if result.format == "torch":
        return f"PyTorch state dict, {size}; reloaded vs materialized: max abs diff {result.max_abs_diff:.2g}"
    kind = f"ONNX ({result.storage}, {result.precision}, opset {result.opset}), {size}"
    if result.precision == "int8":
        weights = "LOSSY" if result.lossy else "exact"
        return (
            f"{kind}; weights {weights} (max error {result.int8_weight_max_error:.2g}); held-out top-1 "
            f"{100 * result.top1:.2f} % vs fp32 {100 * result.reference_top1:.2f} %, same class for "
            f"{100 * result.argmax_agreement:.1f} % of {result.check_examples} images"
        )
    return f"{kind}; onnxruntime vs PyTorch: max abs diff {result.max_abs_diff:.2g}"

"""`maskforge verify`: check an artifact (or an ONNX export against its artifact) byte by byte."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from maskforge.errors import MaskforgeError
from maskforge.textguard import printable

from .app import app


@app.command("verify")
def verify_command(
    file: Annotated[Path, typer.Argument(help="An artifact.safetensors, or an .onnx file (then give --artifact).")],
    artifact: Annotated[
        Optional[Path],
        typer.Option(
            "--artifact", help="The artifact an ONNX file was exported from: metadata and outputs are compared."
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as one JSON object.")] = False,
) -> None:
    """Verify an artifact: layout, schema, digests, structure, masks and every regenerated weight.

    With an ONNX file and --artifact, also check that the ONNX metadata names that artifact and that
    onnxruntime computes what it does: fp32 files (any storage) give the same logits; int8 files hold
    the artifact's weights exactly and their integer kernels agree with the graph run in float. Prints
    OK and the checks, or `error:` naming the failing layer or field (exit code 2).

    Examples:
      maskforge verify runs/conv4/artifact.safetensors
      maskforge verify runs/conv4/artifact.int8.onnx --artifact runs/conv4/artifact.safetensors
    """
    is_onnx = file.suffix.lower() == ".onnx"
    if is_onnx and artifact is None:
        raise MaskforgeError(f"{file} is an ONNX model: give the artifact it was exported from with --artifact")
    if not is_onnx and artifact is not None:
        raise MaskforgeError(
            f"--artifact is for checking an .onnx file against its artifact; {file} is not an .onnx file"
        )
    from maskforge.verify import verify_artifact, verify_onnx  # torch loads here, after the arguments are checked

    report = verify_onnx(file, artifact) if is_onnx else verify_artifact(file)
    if as_json:
        typer.echo(json.dumps(report.to_dict(), indent=2))
    elif report.ok:
        typer.echo(f"OK {file}" + (f" (exported from {artifact})" if artifact is not None else ""))
        for check in report.checks:
            typer.echo(f"  {check.name}: {printable(check.detail)}")  # details may quote the file
        if report.digest:
            typer.echo(f"  artifact digest: {report.digest}")
    report.raise_for_failure()

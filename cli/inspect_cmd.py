"""`maskforge inspect`: what is inside an artifact."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from .app import app
from .console import console as output_console
from .file_hints import require_artifact
from .shown import cell


@app.command("inspect")
def inspect_command(
    file: Annotated[Path, typer.Argument(help="An artifact.safetensors written by `maskforge search`.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of tables.")] = False,
) -> None:
    """Show an artifact's metadata, each layer's shape and density, the file size and bits per weight.

    Example: maskforge inspect runs/conv4/artifact.safetensors --json
    """
    require_artifact(file)
    from maskforge.artifact import inspect_artifact  # torch loads here, after the arguments are checked

    summary = inspect_artifact(file)
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
        return
    console = output_console()
    spec = summary["input"]
    overview = Table(show_header=False, title=cell(file))
    rows = [
        ("architecture", f"{summary['arch']} {summary['arch_args']}"),
        *(
            [
                (
                    "depends on",
                    f"{summary['depends_on']}; built with {summary['library']}; structure sha256 "
                    f"{summary['structure_digest'][:16]}...",
                )
            ]
            if "depends_on" in summary
            else []
        ),
        *(
            [("fixed tensors", ", ".join(f"{name} = {value}" for name, value in summary["fixed_tensors"].items()))]
            if summary.get("fixed_tensors")
            else []
        ),
        ("k (kept fraction)", f"{summary['k']}" + (" (one global threshold)" if summary["topk"] == "global" else "")),
        ("seed / init", f"{summary['seed']} / {summary['init']}{' (scaled fan-in)' if summary['scale_fan'] else ''}"),
        ("input", f"{spec['channels']}x{spec['height']}x{spec['width']}, mean {spec['mean']}, std {spec['std']}"),
        ("classes", ", ".join(spec["class_names"][:12]) + (" ..." if len(spec["class_names"]) > 12 else "")),
        ("masked weights", f"{summary['masked_weights']:,} ({summary['kept_weights']:,} kept)"),
        (
            "file size",
            f"{summary['file_bytes']:,} bytes = {summary['bits_per_weight']:.3f} bits per masked "
            f"weight (dense float32: {summary['dense_float32_bytes']:,} bytes)",
        ),
        ("held-out accuracy", _fmt_acc(summary["provenance"].get("heldout_acc"))),
        ("provenance", ", ".join(f"{key}={value}" for key, value in summary["provenance"].items())),
        ("digest", summary["digest"]),
    ]
    for key, value in rows:
        overview.add_row(key, cell(value))  # values quote the file: escapes and markup shown as text
    console.print(overview)
    layers = Table(title="layers")
    for column in ("layer", "shape", "kept", "density"):
        layers.add_column(column, justify="left" if column in ("layer", "shape") else "right")
    for layer in summary["layers"]:
        layers.add_row(
            cell(layer["name"]), "x".join(map(str, layer["shape"])), f"{layer['kept']:,}", f"{layer['density']:.3f}"
        )
    console.print(layers)


def _fmt_acc(value) -> str:
    return "unknown" if value is None else f"{value:.2%}"

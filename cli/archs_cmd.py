"""`maskforge archs`: the architectures that can be searched."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.table import Table

from maskforge.registry import list_archs  # torch-free: the command starts fast

from .app import app
from .console import console


@app.command("archs")
def archs_command(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON lines instead of a table.")] = False,
    all_: Annotated[
        bool,
        typer.Option(
            "--all",
            help="Also list torchvision's classification builders "
            "(--arch torchvision:NAME) with their masked weights at --input, or why one "
            "cannot be converted (builds each on the meta device: seconds).",
        ),
    ] = False,
    input_: Annotated[str, typer.Option("--input", help="With --all: the input as CxHxW.")] = "3x224x224",
    classes: Annotated[int, typer.Option("--classes", help="With --all: the number of classes.")] = 1000,
) -> None:
    """List the architectures with their masked-weight counts (CIFAR-10 and ImageNet shapes)."""
    if all_:
        _zoo(as_json, input_, classes)
    entries = list_archs()
    if as_json:
        for entry in entries:
            typer.echo(json.dumps(entry))
        return
    table = Table(title="maskforge architectures")
    for column in ("name", "weights @ 3x32x32, 10 classes", "weights @ 3x224x224, 1000 classes", "description"):
        table.add_column(column)
    for entry in entries:
        table.add_row(
            entry["name"], f"{entry['weights_cifar10']:,}", f"{entry['weights_imagenet']:,}", entry["description"]
        )
    console().print(table)


def _zoo(as_json: bool, input_: str, classes: int) -> None:
    from maskforge.convert import zoo  # torch: only --all needs it
    from maskforge.errors import MaskforgeError

    try:
        channels, height, width = (int(part) for part in input_.lower().split("x"))
    except ValueError:
        raise MaskforgeError(f"--input must be CxHxW, e.g. 3x224x224, got {input_!r}") from None
    rows = zoo(channels, classes, (height, width))
    if as_json:
        for row in rows:
            typer.echo(json.dumps(row))
        return
    table = Table(title=f"torchvision classification builders at {channels}x{height}x{width}, {classes} classes")
    for column in ("--arch", "masked weights", "cannot convert because"):
        table.add_column(column)
    for row in rows:
        table.add_row(row["name"], f"{row['weights']:,}" if row["weights"] is not None else "-", row["why"])
    console().print(table)

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
) -> None:
    """List the architectures with their masked-weight counts (CIFAR-10 and ImageNet shapes)."""
    entries = list_archs()
    if as_json:
        for entry in entries:
            typer.echo(json.dumps(entry))
        return
    table = Table(title="maskforge architectures")
    for column in ("name", "weights @ 3x32x32, 10 classes", "weights @ 3x224x224, 1000 classes", "description"):
        table.add_column(column)
    for entry in entries:
        table.add_row(entry["name"], f"{entry['weights_cifar10']:,}", f"{entry['weights_imagenet']:,}",
                      entry["description"])
    console().print(table)

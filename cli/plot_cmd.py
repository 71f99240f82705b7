"""`maskforge plot`: a run's training curves, or a sweep's accuracy against any grid axis."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer


from .app import app


@app.command("plot")
def plot_command(
    folder: Annotated[
        Path, typer.Argument(help="A search run folder (metrics.jsonl) or a sweep folder (sweep.json).", metavar="DIR")
    ],
    x: Annotated[Optional[str], typer.Option(help="Sweeps: the x axis, a grid axis (default k).")] = None,
    hue: Annotated[
        Optional[str],
        typer.Option(
            help="Sweeps: one line per value of these grid axes (comma-separated; default the other axes that vary)."
        ),
    ] = None,
    where: Annotated[
        Optional[list[str]],
        typer.Option(
            help="Sweeps: only the points whose OPTION is one of the VALUES (repeatable), e.g. --where init=signed_constant "
            "--where k=0.1,0.5.",
            metavar="OPTION=VALUES",
        ),
    ] = None,
    out: Annotated[
        Optional[Path],
        typer.Option(
            help="File name stem (no suffix) for the PNG and SVG; default "
            "DIR/curves (runs) or DIR/accuracy_vs_X[_by_HUE] (sweeps)."
        ),
    ] = None,
) -> None:
    """Draw figures (PNG + SVG) with matplotlib.

    A run folder: train/held-out loss, train/held-out accuracy and the learning rate per epoch.
    A sweep folder: held-out accuracy against --x, one line per --hue value, mean ± std over seeds,
    the dense baseline as the line to beat; runs that did not learn are red crosses outside the mean.

    Examples: maskforge plot runs/conv4
              maskforge plot runs/fig3 --x width --where k=0.5
              maskforge plot runs/fig3 --x k --hue init,scale_fan --where width=1
    """
    from maskforge.plotting import plot  # matplotlib loads here, after the arguments are checked
    from maskforge.sweeps import parse_where

    paths = plot(
        folder, x=x, hue=[h.strip() for h in hue.split(",")] if hue else None, stem=out, where=parse_where(where or [])
    )
    for path in paths:
        typer.echo(str(path))

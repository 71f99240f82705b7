"""Where the command line's rich output goes, and how wide it is drawn.

In a terminal, rich fits the terminal's width. Anywhere else (a file, a pipe, nohup, CI, Slurm) there
is no width to fit, and wrapping at rich's fallback of 80 columns breaks one-line summaries mid-sentence
and turns wide tables into grids. So off a terminal nothing is wrapped: a line stays one line and a table
takes the width its cells need, one row per line. COLUMNS, when set, is the width everywhere (rich's own
rule). Help pages are panels that fill their width, so they cannot be unbounded: off a terminal they are
drawn `HELP_WIDTH` columns wide (or COLUMNS).
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Iterator

from rich.console import Console

#: "No limit" for rich: wider than any line or table the commands print.
UNWRAPPED = 10_000
#: The width of `--help` off a terminal: room for a readable description column next to the flags.
HELP_WIDTH = 120


def _columns() -> int | None:
    columns = os.environ.get("COLUMNS", "")
    return int(columns) if columns.isdigit() and int(columns) > 0 else None


def width_for(stream) -> int | None:
    """The width to draw at on `stream`: None (rich measures the terminal, or reads COLUMNS) on a terminal
    or with COLUMNS set; `UNWRAPPED` elsewhere."""
    if _columns() is not None:
        return None
    try:
        terminal = stream.isatty()
    except (AttributeError, ValueError):  # a closed or unusual stream
        terminal = False
    return None if terminal else UNWRAPPED


def console(stderr: bool = False) -> Console:
    """A rich console on stdout (or stderr) sized as the module docstring says."""
    return Console(stderr=stderr, width=width_for(sys.stderr if stderr else sys.stdout))


@contextlib.contextmanager
def help_width() -> Iterator[None]:
    """While Typer draws a help page: `HELP_WIDTH` columns when stdout is not a terminal (and COLUMNS is
    not set), instead of rich's 80."""
    from typer import rich_utils

    previous = rich_utils.MAX_WIDTH
    if width_for(sys.stdout) is not None and previous is None:
        rich_utils.MAX_WIDTH = HELP_WIDTH
    try:
        yield
    finally:
        rich_utils.MAX_WIDTH = previous

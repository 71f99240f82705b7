"""The `maskforge` command line: a thin Typer layer over the library (installed as `maskforge.cli`).

Importing it loads no command module and no torch: each command loads when it runs (see commands.py).
"""

from .app import app, main

__all__ = ["app", "main"]

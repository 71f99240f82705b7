"""The `maskforge` command line: a thin Typer layer over the library (installed as `maskforge.cli`)."""

from .app import app, main
from . import commands  # noqa: F401  (registers every command on `app`)

__all__ = ["app", "main"]

"""The `maskforge` command line: a thin Typer layer over the library (installed as `maskforge.cli`).

Importing it loads no command module and no torch: each command loads when it runs (see commands.py).
A Ctrl-C while the command line itself loads prints one line, not a traceback.
"""

import sys

try:
    from .app import app, main
except KeyboardInterrupt:
    sys.stderr.write("error: interrupted\n")
    sys.exit(130)

__all__ = ["app", "main"]

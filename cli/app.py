"""The Typer app and the error contract every command shares.

User errors (`MaskforgeError`, bad options) print one `error: ...` line on stderr and exit 2. Anything
else is a bug: one line with a hint and exit 1, or the full traceback with `--debug`.
"""

from __future__ import annotations

import os
import sys
from typing import Annotated

import typer
from typer.core import TyperGroup

from maskforge.errors import MaskforgeError

_state = {"debug": os.environ.get("MASKFORGE_DEBUG", "") not in ("", "0")}


class _OneLineErrors(TyperGroup):
    """Click group whose failures end in a single `error:` line and a documented exit code."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        try:
            result = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except typer.TyperException as exc:  # usage errors: unknown option, bad value...
            if not exc.format_message().strip():
                sys.exit(0)  # `maskforge` alone: the help was shown, nothing failed
            _fail(exc.format_message(), 2)
        except typer.Exit as exc:
            sys.exit(exc.exit_code)
        except (typer.Abort, KeyboardInterrupt):
            _fail("interrupted", 130)
        except MaskforgeError as exc:
            _fail(str(exc), 2)
        except Exception as exc:  # noqa: BLE001 - the last line of defence
            if _state["debug"]:
                raise
            _fail(f"unexpected {type(exc).__name__}: {exc} (this is a bug; rerun with --debug for the "
                  f"traceback and report it)", 1)
        sys.exit(result if isinstance(result, int) else 0)


def _fail(message: str, code: int) -> None:
    first_line = " ".join(str(message).split())
    typer.echo(f"error: {first_line}", err=True)
    sys.exit(code)


app = typer.Typer(
    cls=_OneLineErrors,
    name="maskforge",
    help="Find a subnetwork in a seeded random network (edge-popup) and ship it as seed + bit mask.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


@app.callback()
def _root(debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks for unexpected errors.")]
          = False) -> None:
    """maskforge: search -> artifact (seed + mask) -> export (ONNX) -> eval (onnxruntime)."""
    if debug:
        _state["debug"] = True


def main() -> None:
    """Console-script entry point."""
    app()

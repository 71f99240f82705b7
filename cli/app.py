"""The Typer app, its lazily loaded commands, and the error contract every command shares.

User errors (`MaskforgeError`, bad options) print one `error: ...` line on stderr and exit 2. Anything
else is a bug: one line with a hint and exit 1, or the full traceback with `--debug` (or the environment
variable MASKFORGE_DEBUG=1). The debug choice lives in the Typer context, not in a global.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Annotated

import typer
from typer.core import TyperCommand, TyperGroup

from maskforge.errors import MaskforgeError

from .commands import COMMANDS


class _Bug(Exception):
    """An unexpected failure, already described for the one-line report."""


class _Commands(TyperGroup):
    """Loads a command's module when the command is run, and ends every failure in one `error:` line."""

    def list_commands(self, ctx) -> list[str]:
        return [*COMMANDS, *(name for name in super().list_commands(ctx) if name not in COMMANDS)]

    def get_command(self, ctx, name: str):
        command = super().get_command(ctx, name)
        if command is None and name in COMMANDS:  # for the listing in `maskforge --help` only
            return TyperCommand(name, help=COMMANDS[name].summary)
        return command

    def resolve_command(self, ctx, args: list[str]):
        if args and args[0] in COMMANDS and args[0] not in self.commands:
            self.add_command(_load(args[0]), args[0])
        return super().resolve_command(ctx, args)

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (typer.TyperException, typer.Exit, typer.Abort, KeyboardInterrupt, MaskforgeError):
            raise
        except Exception as exc:  # noqa: BLE001 - the last line of defence
            if (ctx.obj or {}).get("debug"):
                raise
            raise _Bug(f"unexpected {type(exc).__name__}: {exc} (this is a bug; rerun with --debug for the "
                       f"traceback and report it)") from exc

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
        except _Bug as exc:
            _fail(str(exc), 1)
        sys.exit(result if isinstance(result, int) else 0)


def _load(name: str):
    """Import a command's module (it registers the command on `app`) and build its click command."""
    importlib.import_module(COMMANDS[name].module)
    info = next(info for info in app.registered_commands if info.name == name)
    return typer.main.get_command_from_info(info, pretty_exceptions_short=app.pretty_exceptions_short,
                                            rich_markup_mode=app.rich_markup_mode)


def _fail(message: str, code: int) -> None:
    first_line = " ".join(str(message).split())
    typer.echo(f"error: {first_line}", err=True)
    sys.exit(code)


app = typer.Typer(
    cls=_Commands,
    name="maskforge",
    help="Find a subnetwork in a seeded random network (edge-popup) and ship it as seed + bit mask.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


@app.callback()
def _root(ctx: typer.Context,
          debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks for unexpected errors.")]
          = False) -> None:
    """maskforge: search -> artifact (seed + mask) -> export (ONNX) -> eval (onnxruntime)."""
    ctx.obj = {"debug": debug or os.environ.get("MASKFORGE_DEBUG", "") not in ("", "0")}


def main() -> None:
    """Console-script entry point."""
    app()

"""The Typer app, its lazily loaded commands, and the error contract every command shares.

User errors (`MaskforgeError`, bad options) print one `error: ...` line on stderr and exit 2. Anything
else is a bug: one line with a hint and exit 1, or the full traceback with `--debug` (or the environment
variable MASKFORGE_DEBUG=1), which may come before or after the command's name. The debug choice lives in
the Typer context, not in a global. Ctrl-C prints `error: interrupted` and exits 130, SIGTERM
`error: terminated` and 143, at any moment (a search first saves its checkpoint: cli/search_cmd.py).
What the library logs is shown as lines on stderr (cli/logs.py).
"""

from __future__ import annotations

import importlib
import inspect
import os
import signal
import sys
from typing import Annotated

import typer
from typer.core import TyperCommand, TyperGroup

from maskforge import __version__
from maskforge.errors import MaskforgeError
from maskforge.textguard import MESSAGE_LIMIT, printable

from . import logs
from .commands import COMMANDS
from .console import help_width


class _Bug(Exception):
    """An unexpected failure, already described for the one-line report."""


class _Stopped(Exception):
    """A signal ended the command: (message, exit code)."""


class Terminated(KeyboardInterrupt):
    """SIGTERM outside a search (which handles it itself): stop like Ctrl-C, exit 143."""

    exit_code = 128 + signal.SIGTERM


def _terminate(signum, frame) -> None:
    raise Terminated()


def _format_help(command, ctx, formatter, draw) -> None:
    """Typer's help page, drawn to read well in a file too: flags show no `<bool>` placeholder (they take
    no value), paragraphs flow to the page's width, and off a terminal the page is `HELP_WIDTH` wide
    (cli/console.py), not 80."""
    for param in command.get_params(ctx):
        if getattr(param, "is_flag", False) and param.metavar is None:
            param.metavar = ""
    command.help = reflow(command.help or "")
    with help_width():
        draw(ctx, formatter)


def reflow(text: str) -> str:
    """Join the lines of each paragraph of a docstring (Typer's rich help keeps every line break, so a
    docstring's lines would end in the middle of the page). An indented line (an example command) keeps
    its own line."""
    paragraphs = []
    for paragraph in inspect.cleandoc(text).split("\n\n"):
        lines = paragraph.split("\n")
        joined = [lines[0]]
        for line in lines[1:]:
            if line.startswith(" ") or joined[-1].startswith(" ") or paragraph.startswith("\b"):
                joined.append(line)
            else:
                joined[-1] += " " + line.strip()
        paragraphs.append("\n".join(joined))
    return "\n\n".join(paragraphs)


class _Command(TyperCommand):
    """A command whose help page reads well anywhere (`_format_help`)."""

    def format_help(self, ctx, formatter) -> None:
        _format_help(self, ctx, formatter, super().format_help)


class _Commands(TyperGroup):
    """Loads a command's module when the command is run, and ends every failure in one `error:` line."""

    def format_help(self, ctx, formatter) -> None:
        _format_help(self, ctx, formatter, super().format_help)

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

    def make_context(self, info_name, args, parent=None, **extra):
        try:
            return super().make_context(info_name, args, parent, **extra)
        except KeyboardInterrupt as exc:  # while parsing the command line; Typer would exit 130 silently
            code = getattr(exc, "exit_code", 130)
            raise _Stopped("terminated" if code == Terminated.exit_code else "interrupted", code) from None

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt as exc:  # Typer would turn it into a silent exit 130
            if (ctx.obj or {}).get("debug"):
                raise
            code = getattr(exc, "exit_code", 130)
            raise _Stopped("terminated" if code == Terminated.exit_code else "interrupted", code) from None
        except (typer.TyperException, typer.Exit, typer.Abort, MaskforgeError):
            raise
        except BrokenPipeError:  # `maskforge ... | head` closed the pipe: stop quietly, as a shell tool does
            _silence_stdout()
            raise typer.Exit(128 + signal.SIGPIPE) from None
        except OSError as exc:
            if (ctx.obj or {}).get("debug"):
                raise
            if exc.filename is None:
                raise _Bug(_bug_text(exc)) from exc
            # a path the user gave that the OS refuses (a name too long, a symlink loop, no permission)
            raise MaskforgeError(f"cannot use {exc.filename}: {exc.strerror or exc}") from None
        except Exception as exc:  # noqa: BLE001 - the last line of defence
            if (ctx.obj or {}).get("debug"):
                raise
            raise _Bug(_bug_text(exc)) from exc

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        args = _debug_first(list(sys.argv[1:] if args is None else args))
        previous_term = signal.getsignal(signal.SIGTERM)
        if previous_term is signal.SIG_DFL:
            signal.signal(signal.SIGTERM, _terminate)
        handler = logs.install()
        try:
            result = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except typer.TyperException as exc:  # usage errors: unknown option, bad value...
            if not exc.format_message().strip():
                sys.exit(0)  # `maskforge` alone: the help was shown, nothing failed
            _fail(exc.format_message(), 2)
        except typer.Exit as exc:
            sys.exit(exc.exit_code)
        except (typer.Abort, KeyboardInterrupt) as exc:
            _fail("terminated" if isinstance(exc, Terminated) else "interrupted", getattr(exc, "exit_code", 130))
        except _Stopped as exc:
            _fail(*exc.args)
        except MaskforgeError as exc:
            _fail(str(exc), 2)
        except _Bug as exc:
            _fail(str(exc), 1)
        finally:
            logs.uninstall(handler)
            if previous_term is signal.SIG_DFL:
                signal.signal(signal.SIGTERM, previous_term)
        sys.exit(result if isinstance(result, int) else 0)


def _bug_text(exc: BaseException) -> str:
    return f"unexpected {type(exc).__name__}: {exc} (this is a bug; rerun with --debug for the traceback and report it)"


def _debug_first(args: list[str]) -> list[str]:
    """`--debug` is an option of `maskforge` itself; accept it after the command's name too (before `--`)."""
    end = args.index("--") if "--" in args else len(args)
    if "--debug" not in args[:end]:
        return args
    return ["--debug", *(arg for arg in args[:end] if arg != "--debug"), *args[end:]]


def _load(name: str):
    """Import a command's module (it registers the command on `app`) and build its click command."""
    importlib.import_module(COMMANDS[name].module)
    info = next(info for info in app.registered_commands if info.name == name)
    return typer.main.get_command_from_info(
        info, pretty_exceptions_short=app.pretty_exceptions_short, rich_markup_mode=app.rich_markup_mode
    )


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so that the interpreter's last flush into the closed pipe does not fail
    a second time (where stdout is a real file descriptor)."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError):  # no file descriptor (a test's buffer): nothing to flush into a pipe
        pass


def _fail(message: str, code: int) -> None:
    # Messages may quote files: control characters are shown as escapes, and the line is bounded.
    first_line = printable(" ".join(str(message).split()), limit=MESSAGE_LIMIT)
    typer.echo(f"error: {first_line}", err=True)
    sys.exit(code)


class _App(typer.Typer):
    """The Typer app whose commands are `_Command`s (help pages that read well anywhere), however they are
    built: loaded when run (`_load`), or already imported when Typer builds the group."""

    def command(self, *args, cls=None, **kwargs):
        return super().command(*args, cls=cls or _Command, **kwargs)


app = _App(
    cls=_Commands,
    name="maskforge",
    help="Find a subnetwork in a seeded random network (edge-popup) and ship it as seed + bit mask.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _show_version(value: bool) -> None:
    if value:
        typer.echo(f"maskforge {__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(
    ctx: typer.Context,
    debug: Annotated[
        bool,
        typer.Option(
            "--debug", help="Show full tracebacks for unexpected errors (also accepted after the command's name)."
        ),
    ] = False,
    version: Annotated[
        bool,
        typer.Option("--version", help="Show maskforge's version and exit.", is_eager=True, callback=_show_version),
    ] = False,
) -> None:
    """maskforge: search -> artifact (seed + mask) -> export (ONNX) -> eval (onnxruntime)."""
    ctx.obj = {"debug": debug or os.environ.get("MASKFORGE_DEBUG", "") not in ("", "0")}


def main() -> None:
    """Console-script entry point (also `python -m maskforge` and `python -m maskforge.cli`)."""
    app(prog_name="maskforge")

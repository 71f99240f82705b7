"""`maskforge search`: run edge-popup and write the artifact (or continue a run with --resume).

The options are built from `maskforge.schema.SearchConfig`, one per field: its name (`--batch-size`),
its type, and its help (the field's description, with the default). Every option defaults to "not
given": only what the user types reaches the config, so the schema's defaults (and through `None`
fields, the architecture's and the device's) apply to everything else, and `--resume` can tell what was
typed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import sys
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

import typer

from maskforge.schema import SearchConfig

from .app import app

_EXAMPLES = """Search a subnetwork of a seeded random network with edge-popup and save it as an artifact.

Only the scores are trained; the weights stay at their seeded random values. The artifact stores the
seed, one bit per weight and the batch-norm statistics.

Example: maskforge search --arch conv4 --k 0.5 --epochs 10 --out runs/conv4

Several GPUs or nodes: start the same command with torchrun, e.g.
torchrun --nproc-per-node 8 -m maskforge.cli search --arch wrn50 --data /imagenet --batch-size 256 ...
(see docs/SCALE.md).
"""


def _python_type(hint: Any) -> type:
    """The command-line type of a schema field: int, float, str or bool (Literal choices are strings)."""
    while True:
        origin = typing.get_origin(hint)
        if origin is Annotated:
            hint = typing.get_args(hint)[0]
        elif origin is Union:  # Optional[X]
            hint = next(arg for arg in typing.get_args(hint) if arg is not type(None))
        elif origin is Literal:
            return type(typing.get_args(hint)[0])
        else:
            return hint


def _option(name: str, hint: Any) -> inspect.Parameter:
    info = SearchConfig.__pydantic_fields__[name]
    kind = _python_type(hint)
    flag = "--" + name.replace("_", "-")
    decls = [f"{flag}/--no-{flag[2:]}"] if kind is bool else [flag]
    default = info.default
    shown = str(default).lower() if kind is bool else str(default)
    # A None default is explained by the description; "\[" keeps rich from reading "[default" as markup.
    help_text = info.description if default is None else f"{info.description} \\[default: {shown}]"
    option = typer.Option(*decls, help=help_text, show_default=False)
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None,
                             annotation=Annotated[Optional[kind], option])


_HINTS = typing.get_type_hints(SearchConfig, include_extras=True)
CONFIG_OPTIONS = [_option(field.name, _HINTS[field.name]) for field in dataclasses.fields(SearchConfig)]


def search_command(ctx: typer.Context, resume_dir: Optional[Path] = None, quiet: bool = False,
                   **options: Any) -> None:
    given = {name: value for name, value in options.items() if value is not None}
    from maskforge.search import resume, search  # torch loads here, not for --help

    with contextlib.ExitStack() as stack:
        callbacks = {}
        if not quiet and sys.stderr.isatty():
            from .progress import SearchProgress

            bar = stack.enter_context(SearchProgress())
            callbacks = {"on_step": bar.on_step, "on_epoch": bar.on_epoch}
        if resume_dir is not None:
            result = resume(resume_dir, given, **callbacks)
        else:
            result = search(SearchConfig(**given), **callbacks)
    if result.rank != 0:
        return  # under torchrun only rank 0 reports
    from rich.console import Console

    console = Console()
    art = result.artifact
    last = result.metrics[-1]
    console.print(f"[bold green]done[/]: {art.arch} k={art.k} seed={art.seed}  held-out accuracy "
                  f"{last['heldout_acc']:.2%} after {last['epoch']} epoch(s), {last['step']} steps")
    console.print(f"artifact {result.artifact_path} ({art.file_bytes:,} bytes, "
                  f"{8 * art.file_bytes / art.masked_weights:.3f} bits per masked weight)")


_RESUME = inspect.Parameter("resume_dir", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[
    Optional[Path], typer.Option(
        "--resume", metavar="DIR",
        help="Continue the search in run folder DIR from its checkpoint, with the arguments recorded in "
             "DIR/config.json. Only --workers and --checkpoint-every may change; any other option given must "
             "equal the recorded value. The final artifact is the one the uninterrupted search writes.")])
_QUIET = inspect.Parameter("quiet", inspect.Parameter.KEYWORD_ONLY, default=False,
                           annotation=Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")])
search_command.__signature__ = inspect.Signature(
    [inspect.Parameter("ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=typer.Context),
     *CONFIG_OPTIONS, _RESUME, _QUIET])
search_command.__doc__ = _EXAMPLES
app.command("search")(search_command)

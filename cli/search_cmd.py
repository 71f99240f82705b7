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
import json
import shlex
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.markup import escape

from maskforge.errors import MaskforgeError
from maskforge.runfiles import METRICS_NAME
from maskforge.schema import SearchConfig, field_kind

from .app import app

_EXAMPLES = """Search a subnetwork of a seeded random network with edge-popup and save it as an artifact.

Only the scores are trained; the weights stay at their seeded random values. The artifact stores the
seed, one bit per weight and the batch-norm statistics.

Example (writes runs/conv4-k0.5-s0/):

  maskforge search --arch conv4 --k 0.5 --epochs 10

Ctrl-C or SIGTERM stops at the next step with a checkpoint (exit 130 or 143); the same command, or
--resume DIR, continues it. Outside a terminal, progress is one line per epoch on stderr.

Several GPUs or nodes: start the same command with torchrun (see docs/SCALE.md), e.g.

  torchrun --nproc-per-node 8 -m maskforge.cli search --arch wrn50 --data /imagenet --batch-size 256 ...
"""


def _option(name: str) -> inspect.Parameter:
    info = SearchConfig.__pydantic_fields__[name]
    kind, _ = field_kind(name)
    flag = "--" + name.replace("_", "-")
    decls = [f"{flag}/--no-{flag[2:]}"] if kind is bool else [flag]
    default = info.default
    shown = str(default).lower() if kind is bool else str(default)
    # The help is rich markup: escape() keeps "[tensorboard]" in the description, "\[" the "[default".
    description = escape(info.description)
    help_text = description if default is None else f"{description} \\[default: {shown}]"
    numeric = {"parser": _number(name, kind), "metavar": f"<{kind.__name__}>"} if kind in (int, float) else {}
    option = typer.Option(*decls, help=help_text, show_default=False, **numeric)
    return inspect.Parameter(
        name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[Optional[kind], option]
    )


def k_problem(value: float) -> str | None:
    """What is wrong with a --k value, with the percentage it was probably meant as (None: nothing)."""
    if 0 < value <= 1:
        return None
    meant = f"; did you mean --k {value / 100:g}?" if 10 <= value <= 100 else ""  # a percentage
    return f"k is the fraction of weights kept, in (0, 1] (--k 0.3 keeps 30 % of every layer){meant}"


def _number(name: str, kind: type):
    """The parser of a numeric option, with the hints a first-time user needs: one search takes one value
    (lists are for `maskforge sweep`), and k is a fraction."""
    flag = "--" + name.replace("_", "-")

    def parse(text: str):
        if isinstance(text, kind):
            return text
        if "," in str(text):
            raise typer.BadParameter(
                f"{text!r} is a list, but one search takes one value; `maskforge sweep "
                f"{flag} {text}` runs one search per value"
            )
        try:
            value = kind(text)
        except ValueError:
            raise typer.BadParameter(f"{text!r} is not a valid {'integer' if kind is int else 'number'}") from None
        if name == "k" and k_problem(value):
            raise typer.BadParameter(k_problem(value))
        return value

    parse.__name__ = kind.__name__
    return parse


CONFIG_OPTIONS = [_option(field.name) for field in dataclasses.fields(SearchConfig)]


def search_command(
    ctx: typer.Context,
    resume_dir: Optional[Path] = None,
    quiet: bool = False,
    overwrite: bool = False,
    as_json: bool = False,
    **options: Any,
) -> None:
    given = {name: value for name, value in options.items() if value is not None}
    if resume_dir is not None and overwrite:
        raise MaskforgeError(
            "--overwrite does not apply with --resume (which continues the search in DIR); to "
            "start DIR over, leave --resume out: the same options with --out DIR --overwrite"
        )
    config = _config(given) if resume_dir is None else None  # a bad value is refused before torch loads
    from maskforge.distributed import detect
    from maskforge.searches import SearchInterrupted, resume, search  # torch loads here, not for --help

    from . import logs

    if quiet:
        logs.quiet()
    try:
        with contextlib.ExitStack() as stack:
            callbacks = {}
            if not quiet and detect().is_main:  # the library reports progress on rank 0 only: an empty
                # bar on another rank would still redraw (and erase) the shared terminal's line
                from .progress import LineProgress, SearchProgress

                shown = stack.enter_context(SearchProgress()) if sys.stderr.isatty() else LineProgress()
                callbacks = {"on_step": shown.on_step, "on_epoch": shown.on_epoch}
            if resume_dir is not None:
                result = resume(resume_dir, given, **callbacks)
            else:
                result = search(config, overwrite=overwrite, **callbacks)
    except SearchInterrupted as stopped:
        if detect().is_main:
            _report_interrupted(stopped, as_json, resume_dir is None)
        raise typer.Exit(stopped.exit_code) from None
    if result.rank != 0:
        return  # under torchrun only rank 0 reports
    summary = _summary(result)
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
        return
    last = result.metrics[-1]
    word = "already done" if result.already_done else "done"
    done = typer.style(word, fg="green", bold=True) if sys.stdout.isatty() else word
    typer.echo(
        f"{done}: {summary['arch']} k={summary['k']} seed={summary['seed']}  held-out accuracy "
        f"{last['heldout_acc']:.2%} after {last['epoch']} epoch(s), {last['step']} steps"
    )
    typer.echo(
        f"artifact {result.artifact_path} ({summary['file_bytes']:,} bytes, "
        f"{summary['bits_per_weight']:.3f} bits per masked weight)"
    )
    if result.already_done:
        typer.echo(
            f"nothing ran: {result.run_dir} holds this search (the same arguments), finished; --overwrite runs it again"
        )
    typer.echo("next:\n" + "".join(f"  {command}\n" for command in summary["next"]).rstrip("\n"))


def _config(given: dict) -> SearchConfig:
    """The search's config; a refused value is named by the flag the user typed (`--batch-size`), not by
    the config field (`batch_size`)."""
    try:
        return SearchConfig(**given)
    except MaskforgeError as exc:
        message = str(exc)
        for name in given:
            message = message.replace(f"search config: {name} ", f"--{name.replace('_', '-')} ", 1)
        raise MaskforgeError(message) from None


def _summary(result) -> dict:
    """What `--json` prints: the run, its result and the commands that take it further."""
    art, last = result.artifact, result.metrics[-1]
    artifact = str(result.artifact_path)
    from maskforge.export.modes import default_export_path, resolve_mode
    from maskforge.sizes import bits_per_weight

    # The file a plain `export` writes: regen where the distribution allows it, else compact (kaiming_normal).
    onnx = str(default_export_path(result.artifact_path, storage=resolve_mode(art).storage))
    return {
        "run_dir": str(result.run_dir),
        "artifact": artifact,
        "arch": art.arch,
        "k": art.k,
        "seed": art.seed,
        "epochs": last["epoch"],
        "steps": last["step"],
        "heldout_acc": last["heldout_acc"],
        "heldout_loss": last["heldout_loss"],
        "train_loss": last["train_loss"],
        "file_bytes": art.file_bytes,
        "bits_per_weight": bits_per_weight(art.file_bytes, art.masked_weights),
        "metrics": str(result.run_dir / METRICS_NAME),
        "already_done": result.already_done,
        "next": [
            f"maskforge inspect {shlex.quote(artifact)}",
            f"maskforge export {shlex.quote(artifact)}",
            f"maskforge eval {shlex.quote(onnx)}",
        ],
    }


def _report_interrupted(stopped, as_json: bool, fresh: bool) -> None:
    """Where the checkpoint is and the exact command that continues the search (stderr; JSON on stdout)."""
    command = None
    if stopped.resumable and stopped.run_dir is not None:
        from maskforge.distributed import detect

        folder = shlex.quote(str(stopped.run_dir))
        command = (
            f"torchrun <the same torchrun options> -m maskforge.cli search --resume {folder}"
            if detect().is_distributed
            else f"maskforge search --resume {folder}"
        )
    typer.echo(stopped.describe(), err=True)
    if command:
        typer.echo(f"continue with: {command}" + (" (or run the same command again)" if fresh else ""), err=True)
    if as_json:
        typer.echo(
            json.dumps(
                {
                    "interrupted": stopped.signal_name,
                    "exit_code": stopped.exit_code,
                    "run_dir": str(stopped.run_dir) if stopped.run_dir else None,
                    "checkpoint_step": stopped.checkpoint_step,
                    "total_steps": stopped.total_steps,
                    "resume": command,
                },
                indent=2,
            )
        )


_RESUME = inspect.Parameter(
    "resume_dir",
    inspect.Parameter.KEYWORD_ONLY,
    default=None,
    annotation=Annotated[
        Optional[Path],
        typer.Option(
            "--resume",
            metavar="DIR",
            help="Continue the search in run folder DIR from its checkpoint, with the arguments recorded in "
            "DIR/config.json. --workers, --checkpoint-every, --keep-checkpoint and --tensorboard may change; "
            "--epochs and --max-steps may grow (extending the search, a finished one too if it kept its "
            "checkpoint); any other option given must equal the recorded value. Unless extended, the final "
            "artifact is the one the uninterrupted search writes.",
        ),
    ],
)
_QUIET = inspect.Parameter(
    "quiet",
    inspect.Parameter.KEYWORD_ONLY,
    default=False,
    annotation=Annotated[
        bool, typer.Option("--quiet", "-q", help="No progress and no notices: warnings, errors and the summary only.")
    ],
)
_OVERWRITE = inspect.Parameter(
    "overwrite",
    inspect.Parameter.KEYWORD_ONLY,
    default=False,
    annotation=Annotated[
        bool,
        typer.Option(
            "--overwrite",
            help="Replace the search in --out (finished, or unfinished with other "
            "arguments): its files move to OUT/previous-N/ first. Without --out: "
            "start a new numbered folder instead of continuing an unfinished one. "
            "Not with --resume.",
        ),
    ],
)
_JSON = inspect.Parameter(
    "as_json",
    inspect.Parameter.KEYWORD_ONLY,
    default=False,
    annotation=Annotated[
        bool,
        typer.Option(
            "--json", help="Print the summary (run folder, artifact, accuracy, next commands) as JSON on stdout."
        ),
    ],
)
search_command.__signature__ = inspect.Signature(
    [
        inspect.Parameter("ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=typer.Context),
        *CONFIG_OPTIONS,
        _RESUME,
        _QUIET,
        _OVERWRITE,
        _JSON,
    ]
)
search_command.__doc__ = _EXAMPLES
app.command("search")(search_command)

"""`maskforge sweep`: a grid of searches (comma lists) under one folder, with results.csv and a figure.

Every search option of `maskforge.schema.SearchConfig` (but `out` and `seed`, which `--out` and `--seeds`
replace) is an option here too, built from the same field: its name, and its description as the help.
Each takes a comma list; a list of several values is a grid axis.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from maskforge.errors import MaskforgeError
from maskforge.runfiles import RESULTS_FILE
from maskforge.schema import SearchConfig, field_kind
from maskforge.spelling import spell

from .app import app
from .console import console as output_console
from .search_cmd import k_problem

_NOT_OPTIONS = ("out", "seed")  # --out is the sweep folder; --seeds replaces --seed
_BOOLEAN_HELP = "on or off (also true/false, yes/no, 1/0); both: on,off"


def _list_option(name: str) -> inspect.Parameter:
    """`--name LIST` for the SearchConfig field `name`: its description, how to list values, its default."""
    info = SearchConfig.__pydantic_fields__[name]
    default = info.default
    values = _BOOLEAN_HELP if field_kind(name)[0] is bool else "a comma list"
    shown = "" if default is None else f"; default {str(default).lower() if isinstance(default, bool) else default}"
    option = typer.Option(
        "--" + name.replace("_", "-"),
        metavar="LIST",
        show_default=False,
        help=f"{escape(info.description)} \\[{values}{shown}]",
    )
    return inspect.Parameter(
        name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[Optional[str], option]
    )


SEARCH_OPTIONS = [_list_option(f.name) for f in dataclasses.fields(SearchConfig) if f.name not in _NOT_OPTIONS]


def sweep_command(
    out: Optional[Path] = None,
    seeds: Optional[str] = None,
    dense_baseline: bool = False,
    shard: Optional[str] = None,
    collect: Optional[Path] = None,
    x: Optional[str] = None,
    hue: Optional[str] = None,
    figure: bool = True,
    quiet: bool = False,
    **texts: Optional[str],
) -> None:
    _check_k(texts.get("k"))  # a usage error answers before torch loads
    from maskforge.sweeps import collect_sweep, options_from_text, parse_shard, sweep  # torch loads here

    from . import logs

    if quiet:
        logs.quiet()  # each point's start line and estimate too; warnings stay

    hue_list = [h.strip() for h in hue.split(",")] if hue else None
    console = output_console()  # logs and pipes: no squeezed table (cli/console.py)
    if collect is not None:
        if out is not None and out.resolve() != collect.resolve():
            raise MaskforgeError(f"--collect {collect} and --out {out} name different folders; give one")
        given = [f"--{name.replace('_', '-')}" for name, value in texts.items() if value is not None]
        given += [name for name, value in (("--seeds", seeds), ("--shard", shard)) if value is not None]
        given += ["--dense-baseline"] if dense_baseline else []
        if given:
            verb = "does" if len(given) == 1 else "do"
            raise MaskforgeError(
                f"--collect runs nothing, so {', '.join(given)} {verb} not apply: it gathers "
                f"the points already in {collect}"
            )
        result = collect_sweep(collect, figures=figure, x=x, hue=hue_list)
    else:
        if out is None:
            raise MaskforgeError("give the sweep folder with --out DIR (or --collect DIR to gather one)")
        options = options_from_text(texts, seeds)
        progress = _PointProgress(console, None if quiet else "bar" if sys.stderr.isatty() else "lines")
        try:
            result = sweep(
                out,
                options,
                dense_baseline=dense_baseline,
                shard=parse_shard(shard) if shard else (0, 1),
                on_step=progress.on_step,
                on_epoch=progress.on_epoch,
                on_point=progress.on_point,
                figures=figure,
                x=x,
                hue=hue_list,
            )
        except KeyboardInterrupt as stopped:  # Ctrl-C, or SIGTERM through the search (SearchInterrupted)
            progress.close()
            _report_stopped(stopped)
            raise  # the app prints `error: interrupted` / `terminated` and exits 130 / 143
        finally:
            progress.close()  # a Ctrl-C leaves the terminal as it was
    _print_summary(console, result)
    failed = [row for row in result.rows if row["status"] == "failed"]
    if failed:
        from maskforge.sweeps.results import is_bug

        bug = any(is_bug(row) for row in failed)
        typer.echo(
            f"error: {len(failed)} of {len(result.rows)} sweep points failed (first: {failed[0]['point']}: "
            f"{failed[0]['error']}); see {result.out / RESULTS_FILE}",
            err=True,
        )
        raise typer.Exit(1 if bug else 2)


def _check_k(text: str | None) -> None:
    """Refuse a --k list with a value outside (0, 1] in one line, with search's hint (a percentage?)."""
    if not text:
        return
    for item in text.split(","):
        try:
            value = float(item)
        except ValueError:
            continue  # not a number: the sweep's own parser names it
        problem = k_problem(value)
        if problem:
            raise MaskforgeError(f"--k {text}: " + (f"{item.strip()}: " if "," in text else "") + problem)


def _report_stopped(stopped: KeyboardInterrupt) -> None:
    """What the stop left and how to go on (stderr): nothing finished is lost, the same command continues."""
    describe = getattr(stopped, "describe", None)  # a search's SearchInterrupted says where its checkpoint is
    if describe is not None:
        typer.echo(describe(), err=True)
    typer.echo(
        "sweep stopped; run the same command again to continue: finished points are skipped, an "
        "interrupted search continues from its checkpoint, an interrupted dense baseline starts over",
        err=True,
    )


def _own(name: str, annotation: Any, option) -> inspect.Parameter:
    default = False if annotation is bool else None
    return inspect.Parameter(
        name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=Annotated[annotation, option]
    )


_OWN = [
    _own(
        "out",
        Optional[Path],
        typer.Option(
            help="Sweep folder: one run folder per point, sweep.json, results.csv, the figure.", metavar="DIR"
        ),
    ),
    _own(
        "seeds",
        Optional[str],
        typer.Option(
            help="Seeds: a count (3 = seeds 0,1,2), a list (0,5,9) or a range (7:10 = 7,8,9). Default: the seed 0.",
            metavar="SEEDS",
        ),
    ),
    _own(
        "dense_baseline",
        bool,
        typer.Option(
            "--dense-baseline",
            help="Also train each architecture (and width) densely, every weight learned, once per "
            "seed (Adam lr 1e-3, cosine; docs/SWEEP.md): the line to beat.",
        ),
    ),
    _own(
        "shard",
        Optional[str],
        typer.Option(
            help="I/N: run only the points whose index is I modulo N (0 <= I < N), e.g. one Slurm array task each. "
            "Then `maskforge sweep --collect DIR`.",
            metavar="I/N",
        ),
    ),
    _own(
        "collect",
        Optional[Path],
        typer.Option(
            help="Run nothing: gather every point of sweep folder DIR into DIR/results.csv, print the summary and "
            "draw the figure.",
            metavar="DIR",
        ),
    ),
    _own(
        "x", Optional[str], typer.Option(help="Figure x axis: a grid axis (default k, or the first one that varies).")
    ),
    _own(
        "hue",
        Optional[str],
        typer.Option(help="Figure lines: grid axes, comma-separated (default: the other axes that vary)."),
    ),
    inspect.Parameter(
        "figure",
        inspect.Parameter.KEYWORD_ONLY,
        default=True,
        annotation=Annotated[bool, typer.Option("--figure/--no-figure", help="Draw the figure (PNG + SVG).")],
    ),
    _own(
        "quiet",
        bool,
        typer.Option(
            "--quiet",
            "-q",
            help="No progress while a point runs (bar or epoch "
            "lines), start lines or time estimates (warnings and "
            "each point's result stay).",
        ),
    ),
]
sweep_command.__signature__ = inspect.Signature([*_OWN, *SEARCH_OPTIONS])
sweep_command.__doc__ = """Run a grid of searches: every combination of the comma lists, each seed, under one folder.

    Each point is an ordinary search run folder DIR/arch=...,k=...,seed=... . Running the same command
    again skips finished points and resumes interrupted ones; a command with more values extends the
    folder; other fixed options are refused. A failing point does not stop the sweep (the command exits
    non-zero at the end). Results: DIR/results.csv, a summary (mean ± std over seeds), and the figure
    DIR/accuracy_vs_<x>.png/.svg. Several machines: add --shard I/N to each, then --collect DIR.
    Every option of `maskforge search` takes a comma list here. Details: docs/SWEEP.md.

    Example (Figure 3 on the demo data):

      maskforge sweep --out runs/fig3 --arch conv4 --k 0.1,0.3,0.5,0.7,0.9 --seeds 2 --scale-fan on
        --epochs 10 --dense-baseline
    """
app.command("sweep")(sweep_command)


class _PointProgress:
    """The sweep's report of each point and its progress while it runs, as `search` shows it: a bar in a
    terminal ("bar"), plain lines elsewhere ("lines": one per epoch, a heartbeat in long epochs, so a log
    file is never silent for a whole point), or nothing (None, --quiet)."""

    def __init__(self, console: Console, mode: str | None) -> None:
        self.console, self.mode, self.bar = console, mode, None

    def on_point(self, event: str, point, info: dict) -> None:
        self.close()
        _report(self.console, event, point, info)
        if event == "start" and self.mode is not None:
            from .progress import LineProgress, SearchProgress

            self.bar = SearchProgress().__enter__() if self.mode == "bar" else LineProgress()

    def on_step(self, step) -> None:
        if self.bar is not None:
            self.bar.on_step(step)

    def on_epoch(self, record: dict) -> None:
        if self.bar is not None:
            self.bar.on_epoch(record)

    def close(self) -> None:
        if hasattr(self.bar, "__exit__"):  # the terminal bar; plain lines hold nothing open
            self.bar.__exit__(None, None, None)
        self.bar = None


def _report(console: Console, event: str, point, info: dict) -> None:
    if event == "start":
        console.print(f"[{info['index'] + 1}/{info['total']}] {point.name} ...")
        return
    row = info["row"]
    if info["outcome"] == "skipped":
        console.print("    finished earlier: skipped")
    elif info["outcome"] == "failed":
        console.print(f"    [red]failed[/] after {info['seconds']:.0f} s: {row['error']}")
    else:
        learned = "" if row["learned"] is True else "  [red](did not learn)[/]"
        console.print(f"    done in {info['seconds']:.0f} s: held-out {_percent(row['heldout_acc'])}{learned}")


def _percent(value) -> str:
    return f"{100 * value:.2f} %" if isinstance(value, (int, float)) and math.isfinite(value) else "n/a"


def _print_summary(console: Console, result) -> None:
    keys = [axis for axis in result.axes if axis != "seed"]
    searches = [group["values"] for group in result.summary if group["kind"] == "search"]
    varying = [key for key in keys if len({spell(values.get(key)) for values in searches}) > 1]
    same = ", ".join(f"{key}={spell(searches[0][key])}" for key in keys if key not in varying) if searches else ""
    # The heading is printed above the table, not as its title: a title wraps at the table's width.
    console.print(
        f"{result.out}: final held-out accuracy (%), mean ± std over the seeds that learned",
        markup=False,
        highlight=False,
    )
    if same:
        console.print(same, markup=False, highlight=False)
    table = Table()
    for column in ["kind", *varying, "done", "held-out %", "not learned", "failed", "wall s"]:
        table.add_column(column, justify="left" if column in ("kind", *varying) else "right", no_wrap=True)
    for group in result.summary:
        accuracy = _mean_std(group)
        table.add_row(
            group["kind"],
            *[spell(group["values"].get(key, "")) for key in varying],
            f"{group['done']}/{group['runs']}",
            accuracy,
            str(group["not_learned"] or ""),
            str(group["failed"] or ""),
            f"{group['wall_s']:.0f}",
        )
    console.print(table)
    console.print(f"results: {result.out / RESULTS_FILE}")
    if result.figures:
        console.print("figure: " + "  ".join(str(path) for path in result.figures), soft_wrap=True)
    elif result.figure_note:
        console.print(result.figure_note)


def _mean_std(group: dict) -> str:
    """`97.10 ± 0.35` over the seeds that learned; one seed has no spread to show: `97.10 (n=1)`."""
    if not group["learned"]:
        return "n/a"
    if group["learned"] == 1:
        return f"{100 * group['mean']:.2f} (n=1)"
    return f"{100 * group['mean']:.2f} ± {100 * group['std']:.2f}"

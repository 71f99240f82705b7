"""`maskforge sweep`: a grid of searches (comma lists) under one folder, with results.csv and a figure."""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from maskforge.errors import MaskforgeError
from maskforge.search import SearchConfig
from maskforge.sweeps import collect_sweep, options_from_text, parse_shard, sweep

from .app import app

_LIST = "comma list"
_D = SearchConfig()


def _opt(help_text: str, *flags: str, **extra):
    return typer.Option(*flags, help=help_text, metavar="LIST", **extra)


@app.command("sweep")
def sweep_command(
    out: Annotated[Optional[Path], typer.Option(help="Sweep folder: one run folder per point, sweep.json, "
                                                     "results.csv, the figure.")] = None,
    arch: Annotated[Optional[str], _opt(f"Architectures ({_LIST}; default {_D.arch}).")] = None,
    k: Annotated[Optional[str], _opt(f"Fractions of weights kept, each in (0, 1] (default {_D.k}).", "--k")] = None,
    seeds: Annotated[Optional[str], typer.Option(
        help="Seeds: a count (3 = seeds 0,1,2), a list (0,5,9) or a range (7:10 = 7,8,9). Default: the seed 0.",
        metavar="SEEDS")] = None,
    init: Annotated[Optional[str], _opt(f"Weight distributions (default {_D.init}).")] = None,
    scale_fan: Annotated[Optional[str], _opt("Scaled fan-in sigma = sqrt(2/(k*fan_in)): on, off, or both: "
                                             "on,off (default off).", "--scale-fan")] = None,
    width: Annotated[Optional[str], _opt("Width multipliers of the conv/fc hidden layers (default 1).")] = None,
    topk: Annotated[Optional[str], _opt("Top-k rules, e.g. per_layer,global (when this maskforge has them).")]
    = None,
    data: Annotated[Optional[str], _opt(f"Data (default {_D.data}); see `maskforge search --help`.")] = None,
    epochs: Annotated[Optional[str], _opt(f"Epochs (default {_D.epochs}).")] = None,
    max_steps: Annotated[Optional[str], _opt("Stop every run after this many steps (smoke runs).")] = None,
    batch_size: Annotated[Optional[str], _opt(f"Global batch sizes (default {_D.batch_size}).")] = None,
    lr: Annotated[Optional[str], _opt(f"Peak learning rates of the scores (default {_D.lr}).")] = None,
    momentum: Annotated[Optional[str], _opt(f"SGD momentum (default {_D.momentum}).")] = None,
    weight_decay: Annotated[Optional[str], _opt(f"Weight decay (default {_D.weight_decay}).")] = None,
    label_smoothing: Annotated[Optional[str], _opt(f"Label smoothing (default {_D.label_smoothing}).")] = None,
    warmup_epochs: Annotated[Optional[str], _opt("Warm-up epochs (default 0).")] = None,
    device: Annotated[Optional[str], _opt("auto, cpu or cuda (default auto).")] = None,
    workers: Annotated[Optional[str], _opt("Data-loader processes for image folders.")] = None,
    image_size: Annotated[Optional[str], _opt("Image folders: resize to this side.")] = None,
    checkpoint_every: Annotated[Optional[str], _opt("Also checkpoint every N steps.")] = None,
    compile_model: Annotated[Optional[str], _opt("torch.compile each run: true or false.", "--compile")] = None,
    dense_baseline: Annotated[bool, typer.Option(
        "--dense-baseline", help="Also train each architecture (and width) densely, every weight learned, once "
                                 "per seed (Adam lr 1e-3, cosine; docs/SWEEP.md): the line to beat.")] = False,
    shard: Annotated[Optional[str], typer.Option(
        help="I/N: run only the points whose index is I modulo N (0 <= I < N), e.g. one Slurm array task "
             "each. Then `maskforge sweep --collect DIR`.", metavar="I/N")] = None,
    collect: Annotated[Optional[Path], typer.Option(
        help="Run nothing: gather every point of sweep folder DIR into DIR/results.csv, print the summary "
             "and draw the figure.", metavar="DIR")] = None,
    x: Annotated[Optional[str], typer.Option(help="Figure x axis: a grid axis (default k, or the first one "
                                                  "that varies).")] = None,
    hue: Annotated[Optional[str], typer.Option(help="Figure lines: grid axes, comma-separated (default: the "
                                                    "other axes that vary).")] = None,
    figure: Annotated[bool, typer.Option("--figure/--no-figure", help="Draw the figure (PNG + SVG).")] = True,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No per-run progress bars.")] = False,
) -> None:
    """Run a grid of searches: every combination of the comma lists, each seed, under one folder.

    Each point is an ordinary search run folder DIR/arch=...,k=...,seed=... . Running the same command
    again skips finished points and resumes interrupted ones; a command with more values extends the
    folder; other fixed options are refused. A failing point does not stop the sweep (the command exits
    non-zero at the end). Results: DIR/results.csv, a summary (mean ± std over seeds), and the figure
    DIR/accuracy_vs_<x>.png/.svg. Several machines: add --shard I/N to each, then --collect DIR.
    Details: docs/SWEEP.md.

    Example (Figure 3 on the demo data):
    maskforge sweep --out runs/fig3 --arch conv4 --k 0.1,0.3,0.5,0.7,0.9 --seeds 2 --scale-fan on
    --epochs 10 --dense-baseline
    """
    hue_list = [h.strip() for h in hue.split(",")] if hue else None
    console = Console() if sys.stdout.isatty() else Console(width=160)  # logs and pipes: no squeezed table
    if collect is not None:
        if out is not None and out.resolve() != collect.resolve():
            raise MaskforgeError(f"--collect {collect} and --out {out} name different folders; give one")
        result = collect_sweep(collect, figures=figure, x=x, hue=hue_list)
    else:
        if out is None:
            raise MaskforgeError("give the sweep folder with --out DIR (or --collect DIR to gather one)")
        texts = {"arch": arch, "k": k, "init": init, "scale_fan": scale_fan, "width": width, "topk": topk,
                 "data": data, "epochs": epochs, "max_steps": max_steps, "batch_size": batch_size, "lr": lr,
                 "momentum": momentum, "weight_decay": weight_decay, "label_smoothing": label_smoothing,
                 "warmup_epochs": warmup_epochs, "device": device, "workers": workers, "image_size": image_size,
                 "checkpoint_every": checkpoint_every, "compile": compile_model}
        options = options_from_text(texts, seeds)
        progress = not quiet and sys.stderr.isatty()
        result = sweep(out, options, dense_baseline=dense_baseline,
                       shard=parse_shard(shard) if shard else (0, 1), progress=progress,
                       on_point=lambda event, point, info: _report(console, event, point, info),
                       figures=figure, x=x, hue=hue_list)
    _print_summary(console, result)
    failed = [row for row in result.rows if row["status"] == "failed"]
    if failed:
        bug = any(str(row["error"]).startswith("unexpected") for row in failed)
        typer.echo(f"error: {len(failed)} of {len(result.rows)} sweep points failed (first: {failed[0]['point']}: "
                   f"{failed[0]['error']}); see {result.out / 'results.csv'}", err=True)
        raise typer.Exit(1 if bug else 2)


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
    varying = [key for key in keys if len({_cell(values.get(key)) for values in searches}) > 1]
    same = ", ".join(f"{key}={_cell(searches[0][key])}" for key in keys if key not in varying) if searches else ""
    table = Table(title=f"{result.out}: final held-out accuracy (%), mean ± std over the seeds that learned"
                        + (f"\n{same}" if same else ""))
    for column in ["kind", *varying, "done", "held-out %", "not learned", "failed", "wall s"]:
        table.add_column(column, justify="left" if column in ("kind", *varying) else "right", no_wrap=True)
    for group in result.summary:
        accuracy = "n/a" if not group["learned"] else \
            f"{100 * group['mean']:.2f} ± {100 * group['std']:.2f}"
        table.add_row(group["kind"], *[_cell(group["values"].get(key, "")) for key in varying],
                      f"{group['done']}/{group['runs']}", accuracy, str(group["not_learned"] or ""),
                      str(group["failed"] or ""), f"{group['wall_s']:.0f}")
    console.print(table)
    console.print(f"results: {result.out / 'results.csv'}")
    if result.figures:
        console.print("figure: " + "  ".join(str(path) for path in result.figures), soft_wrap=True)
    elif result.figure_note:
        console.print(result.figure_note)


def _cell(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return f"{value:g}" if isinstance(value, float) else str(value)

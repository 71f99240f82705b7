"""`maskforge eval`: accuracy, agreement, latency, memory, size and compute of a deployed model in onnxruntime."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from maskforge.errors import MaskforgeError

from .app import app
from .console import console as output_console
from .shown import cell


@app.command("eval")
def eval_command(
    model: Annotated[Path, typer.Argument(help="An exported .onnx file, or an artifact (exported on the fly).")],
    data: Annotated[
        Optional[str],
        typer.Option(
            help="Data set: any `maskforge search --data` source (mnist5k, fashion-mnist, a folder; default: "
            "the one the model was searched on, else mnist5k); with --compare, int8 also calibrates on "
            "its training split."
        ),
    ] = None,
    split: Annotated[str, typer.Option(help="test (the held-out split) or train.")] = "test",
    batch_size: Annotated[
        int, typer.Option(help="Images per onnxruntime call; latency is measured at 1 and at this size.")
    ] = 64,
    threads: Annotated[
        Optional[int], typer.Option(help="Intra-op threads of onnxruntime and PyTorch (default: all cores).")
    ] = None,
    mean: Annotated[
        Optional[str], typer.Option(help="Per-channel mean, comma-separated (ONNX files without maskforge metadata).")
    ] = None,
    std: Annotated[Optional[str], typer.Option(help="Per-channel std, comma-separated.")] = None,
    size: Annotated[Optional[int], typer.Option(help="Input image side in pixels (default: the model's).")] = None,
    reference: Annotated[
        Optional[Path],
        typer.Option(
            help="The artifact or float32 ONNX file to compare predictions with: adds argmax agreement and the "
            "top-1 difference (implied when MODEL is an artifact)."
        ),
    ] = None,
    compare_modes: Annotated[
        bool,
        typer.Option(
            "--compare",
            help="MODEL is an artifact: export it in all six modes (storage dense/compact/regen x "
            "precision fp32/int8) and print them side by side, with speed ratios to dense fp32; "
            "modes it cannot be exported in are listed with the reason.",
        ),
    ] = False,
    latency: Annotated[
        bool, typer.Option("--latency/--no-latency", help="Measure latency, session start and peak memory.")
    ] = True,
    latency_runs: Annotated[int, typer.Option(help="Timed runs per batch size (after warm-up).")] = 30,
    json_out: Annotated[
        Optional[Path],
        typer.Option(
            "--json", help="Also write the report as JSON here (missing folders are created; '-': stdout only)."
        ),
    ] = None,
    confusion_png: Annotated[
        Optional[Path], typer.Option("--confusion-png", help="Also draw the confusion matrix into this PNG file.")
    ] = None,
) -> None:
    """Evaluate a model in onnxruntime: accuracy, agreement with float32, latency, memory and size.

    Reports top-1/top-5 and per-class accuracy on the held-out split (confusion matrix), argmax agreement
    with float32, latency and throughput at batch 1 and B, session start, peak memory, sizes, parameters
    and MACs.

    Examples:

      maskforge eval runs/conv4/artifact.onnx --json report.json --confusion-png confusion.png

      maskforge eval runs/conv4/artifact.safetensors --compare      # all six export modes, one table

      maskforge eval other.onnx --mean 0.1307 --std 0.3081 --reference other.fp32.onnx
    """
    if compare_modes:
        _refuse_with_compare(mean=mean, std=std, size=size, reference=reference, confusion_png=confusion_png)
    from maskforge.evaluation import (
        COMPARE_LATENCY,
        LatencyOptions,
        compare,
        evaluate,  # torch loads here
        save_confusion_png,
        write_report,
    )
    from maskforge.export import check_output_path

    for path, what in ((json_out, "report"), (confusion_png, "figure")):
        if path is not None and str(path) != "-":
            check_output_path(path, what)  # fail before the (long) evaluation, not after
    options = dict(data=data, split=split, batch_size=batch_size, threads=threads)
    timing = COMPARE_LATENCY if compare_modes else LatencyOptions()
    timing = dataclasses.replace(timing, runs=latency_runs) if latency else None
    with _progress() as progress:
        if compare_modes:
            report = compare(model, latency=timing, progress=progress, **options)
        else:
            report = evaluate(
                model, mean=mean, std=std, size=size, reference=reference, latency=timing, progress=progress, **options
            )
    if confusion_png is not None:
        save_confusion_png(report.accuracy, report.model.class_names, confusion_png)
    if json_out is not None and str(json_out) == "-":
        typer.echo(json.dumps(report.to_dict(), indent=2))
    else:
        if json_out is not None:
            write_report(report, json_out)
        _print_report(report, compare_modes)
    accuracy = report.rows[0].report.accuracy if compare_modes else report.accuracy
    if accuracy.unreadable:  # each was a warning line; the report counts the others
        total = accuracy.examples + len(accuracy.unreadable)
        raise MaskforgeError(
            f"{len(accuracy.unreadable)} of {total} {accuracy.split} images could not be decoded "
            f"(see the warnings above); the accuracy counts the other {accuracy.examples}"
        )


def _refuse_with_compare(**options) -> None:
    for name, value in options.items():
        if value is not None:
            raise MaskforgeError(
                f"--{name.replace('_', '-')} does not apply with --compare (it evaluates the artifact's own exports)"
            )


def _print_report(report, compare_modes: bool) -> None:
    from .eval_tables import class_table, compare_table, refused_lines, report_table

    console = output_console()
    if compare_modes:
        console.print(compare_table(report))
        for line in refused_lines(report):
            console.print(line, markup=False, highlight=False, soft_wrap=True)
        notes = [note for row in report.rows for note in row.report.model.notes]
        note = report.rows[0].report.compute.note
    else:
        console.print(report_table(report))
        console.print(class_table(report))
        notes, note = report.model.notes, report.compute.note
    for line in [*dict.fromkeys(notes), note]:
        console.print(cell(line), style="dim")  # notes quote file names and metadata: no markup


@contextlib.contextmanager
def _progress():
    """A spinner that names the current stage (terminals only); yields the `progress` callback."""
    if not sys.stderr.isatty():
        yield None
        return
    console = output_console(stderr=True)
    with console.status("evaluating...", spinner="dots") as status:

        def progress(stage: str, done: int, total: int) -> None:
            text = {
                "exporting": f"exporting mode {done + 1} of {total}",
                "scoring": f"scoring {done:,}/{total:,} images",
                "timing": "timing latency",
                "memory": "measuring session start and peak memory",
            }
            status.update(text.get(stage, stage) + "...")

        yield progress

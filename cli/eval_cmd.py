"""`maskforge eval`: accuracy, latency, size and compute of a deployed model in onnxruntime."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from maskforge.evaluate import evaluate, write_report
from maskforge.export import check_output_path

from .app import app


@app.command("eval")
def eval_command(
    model: Annotated[Path, typer.Argument(help="An exported .onnx file, or an artifact (exported on the fly).")],
    data: Annotated[Optional[str], typer.Option(help="Data set (default: the one the model was searched on, "
                                                     "else mnist5k).")] = None,
    split: Annotated[str, typer.Option(help="test (the held-out split) or train.")] = "test",
    batch_size: Annotated[int, typer.Option(help="Images per onnxruntime call; latency is measured at 1 and "
                                                 "at this size.")] = 64,
    threads: Annotated[Optional[int], typer.Option(help="Intra-op threads of onnxruntime and PyTorch "
                                                        "(default: all cores).")] = None,
    mean: Annotated[Optional[str], typer.Option(help="Per-channel mean, comma-separated (ONNX files without "
                                                     "maskforge metadata).")] = None,
    std: Annotated[Optional[str], typer.Option(help="Per-channel std, comma-separated.")] = None,
    size: Annotated[Optional[int], typer.Option(help="Input image side in pixels.")] = None,
    latency_runs: Annotated[int, typer.Option(help="Timed runs per batch size (after warm-up).")] = 30,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Also write the report as JSON here "
                                                                     "('-' for stdout only).")] = None,
) -> None:
    """Evaluate a model in onnxruntime: top-1/top-5 on the held-out split, latency, sizes, parameters and MACs.

    Example: maskforge eval runs/conv4/artifact.onnx --batch-size 64 --json report.json
    """
    if json_out is not None and str(json_out) != "-":
        check_output_path(json_out)  # fail before the (long) evaluation, not after
    console = Console(stderr=True)
    with console.status("evaluating...", spinner="dots") if sys.stderr.isatty() else _nothing():
        report = evaluate(model, data=data, split=split, batch_size=batch_size, threads=threads, mean=mean,
                          std=std, size=size, latency_runs=latency_runs)
    if json_out is not None:
        if str(json_out) == "-":
            typer.echo(json.dumps(report, indent=2))
            return
        write_report(report, json_out)
    console = Console()
    console.print(report_table(report))
    console.print(f"[dim]{report['sparsity_note']}[/]")


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def report_table(report: dict) -> Table:
    """The report as one rich table (sections: accuracy, latency, size, compute)."""
    table = Table(title=f"maskforge eval: {report['model']}", show_header=True)
    table.add_column("what")
    table.add_column("value", justify="right")
    table.add_column("notes")
    examples = report["examples"]
    table.add_row("[bold]accuracy[/]", "", f"{report['data']} / {report['split']}, {examples:,} examples")
    table.add_row("top-1 (onnxruntime)", f"{report['top1']:.2%}", f"{report['correct']:,} correct")
    table.add_row(f"top-{report['top5_k']} (onnxruntime)", f"{report['top5']:.2%}", f"{report['correct_top5']:,} correct")
    if "torch_top1" in report:
        table.add_row("top-1 (PyTorch, materialized)", f"{report['torch_top1']:.2%}",
                      f"{report['torch_correct']:,} correct; argmax agreement {report['argmax_agreement']:.2%}")
    if report.get("search_heldout_acc") is not None:
        table.add_row("held-out accuracy at search", f"{report['search_heldout_acc']:.2%}", "from the provenance")
    if "latency_ms" in report:
        table.add_row("[bold]latency[/]", "", f"{report['threads']} thread(s); after warm-up")
        for batch, stats in report["latency_ms"].items():
            table.add_row(f"onnxruntime batch {batch}", f"{stats['p50']:.3f} ms",
                          f"p90 {stats['p90']:.3f} / p99 {stats['p99']:.3f} ms, "
                          f"{report['images_per_s'][batch]:,.0f} images/s ({stats['runs']} runs)")
        for batch, stats in report.get("torch_latency_ms", {}).items():
            table.add_row(f"PyTorch eager batch {batch}", f"{stats['p50']:.3f} ms",
                          f"p90 {stats['p90']:.3f} / p99 {stats['p99']:.3f} ms, "
                          f"{report['torch_images_per_s'][batch]:,.0f} images/s; onnxruntime/PyTorch "
                          f"{report['ort_vs_torch'][batch]:.2f}x")
    table.add_row("[bold]size[/]", "", "")
    rows = [("artifact", report.get("artifact_bytes"), report.get("artifact_bits_per_weight")),
            ("ONNX compact", report.get("onnx_compact_bytes"), None),
            ("ONNX dense", report.get("onnx_dense_bytes"), None),
            ("dense float32 equivalent", report.get("dense_float32_bytes"), None)]
    total = report.get("params_total")
    for name, value, bits in rows:
        if value:
            bits = bits if bits is not None else (8 * value / total if total else None)
            table.add_row(name, f"{value:,} B", f"{bits:.3f} bits per weight" if bits is not None else "")
    ratios = {key: value for key, value in (report.get("ratios") or {}).items() if value}
    if ratios:
        table.add_row("ratios", "", ", ".join(f"{key.replace('_', ' ')} {value:.1f}x" for key, value in ratios.items()))
    table.add_row("[bold]compute[/]", "", "")
    if total is not None:
        table.add_row("parameters", f"{total:,}", f"{report['params_kept']:,} kept ({report['density']:.1%})"
                      if report.get("params_kept") is not None else "")
    if report.get("macs_dense") is not None:
        effective = report.get("macs_effective")
        table.add_row("MACs per image", f"{report['macs_dense']:,}",
                      f"effective (x density): {effective:,}" if effective is not None else "")
    return table

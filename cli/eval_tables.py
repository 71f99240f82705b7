"""Rich tables for `maskforge eval`: the report, the per-class accuracy / confusion matrix, the mode comparison.

Printing only: every number comes from the typed report (`maskforge.evaluation.report`).
"""

from __future__ import annotations

from rich.table import Table

from maskforge.evaluation import CompareReport, EvalReport
from maskforge.sizes import bits_per_weight

from .shown import cell

FULL_MATRIX_UP_TO = 20  # classes; above this, only the worst classes are listed
WORST_SHOWN = 10


def _bytes(value: int | None) -> str:
    if value is None:
        return "n/a"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if value >= scale:
            return f"{value / scale:,.1f} {unit}"
    return f"{value:,} B"


def _ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f} ms" if value < 10 else f"{value:,.1f} ms"


def report_table(report: EvalReport) -> Table:
    """The report as one table (sections: model, accuracy, latency, memory, size, compute)."""
    table = Table(title=cell(f"maskforge eval: {report.model.path}"), show_header=True)
    for column, justify in (("what", "left"), ("value", "right"), ("notes", "left")):
        table.add_column(column, justify=justify)
    model, acc = report.model, report.accuracy
    mode = f"storage {model.storage or 'unknown'}, precision {model.precision or 'unknown'}"
    table.add_row(
        "[bold]model[/]",
        cell(model.arch or ""),
        f"{model.kind}; {mode}; input {'x'.join(map(str, model.input_shape))}, {len(model.class_names)} classes",
    )
    table.add_row("[bold]accuracy[/]", "", cell(f"{acc.data} / {acc.split}, {acc.examples:,} examples"))
    table.add_row("top-1 (onnxruntime)", f"{acc.top1:.2%}", f"{acc.correct:,} correct")
    table.add_row(
        f"top-{acc.k} (onnxruntime)",
        f"{acc.topk:.2%}",
        f"{acc.correct_topk:,} correct" + (f" (top-{acc.k}: the model has {acc.k} classes)" if acc.k < 5 else ""),
    )
    if report.agreement is not None:
        agree = report.agreement
        table.add_row("top-1 (float32 reference)", f"{agree.reference_top1:.2%}", agree.reference)
        table.add_row(
            "argmax agreement",
            f"{agree.argmax_agreement:.2%}",
            f"top-1 difference {agree.top1_difference * 100:+.2f} points; max |logit diff| {agree.max_abs_diff:.2g}",
        )
    if acc.search_heldout_acc is not None:
        table.add_row("held-out accuracy at search", f"{acc.search_heldout_acc:.2%}", "from the provenance")
    if report.timing is not None:
        _timing_rows(table, report)
    _size_rows(table, report)
    return table


def _timing_rows(table: Table, report: EvalReport) -> None:
    timing = report.timing
    table.add_row("[bold]latency[/]", "", f"{timing.threads} thread(s); after warm-up")
    for stats in timing.latency:
        name = "onnxruntime" if stats.runtime == "onnxruntime" else "PyTorch eager"
        runs = f"{stats.runs} runs" + (" (time budget reached)" if stats.runs < timing.runs_requested else "")
        table.add_row(
            f"{name} batch {stats.batch}",
            _ms(stats.p50_ms),
            f"p50; p90 {_ms(stats.p90_ms)} / p99 {_ms(stats.p99_ms)}, {stats.images_per_s:,.0f} images/s ({runs})",
        )
    if timing.session_start_ms is not None:
        table.add_row("session start", _ms(timing.session_start_ms), "median of 3, in a fresh process")
        table.add_row(
            "peak memory",
            _bytes(timing.peak_rss_bytes),
            f"resident set of that process; the model adds {_bytes(timing.model_rss_bytes)}",
        )


def _size_rows(table: Table, report: EvalReport) -> None:
    size, compute = report.size, report.compute
    table.add_row("[bold]size[/]", "", "")
    rows = (
        ("ONNX file", size.onnx_bytes, size.onnx_bits_per_weight),
        ("artifact", size.artifact_bytes, size.artifact_bits_per_weight),
        ("dense float32 equivalent", size.dense_float32_bytes, None),
    )
    for name, value, bits in rows:
        if value:
            bits = (
                bits
                if bits is not None
                else (bits_per_weight(value, size.masked_weights) if size.masked_weights else None)
            )
            table.add_row(name, f"{value:,} B", f"{bits:.3f} bits per masked weight" if bits is not None else "")
    table.add_row("[bold]compute[/]", "", "")
    if compute.params_total is not None:
        table.add_row(
            "parameters",
            f"{compute.params_total:,}",
            f"{compute.params_kept:,} kept ({compute.density:.1%})" if compute.params_kept is not None else "",
        )
    if compute.macs_dense is not None:
        table.add_row(
            "MACs per image",
            f"{compute.macs_dense:,}",
            f"effective (x density): {compute.macs_effective:,}" if compute.macs_effective is not None else "",
        )


def class_table(report: EvalReport) -> Table:
    """Per-class accuracy; with up to 20 classes the full confusion matrix (rows: true, columns: predicted)."""
    acc = report.accuracy
    names = report.model.class_names
    if len(names) <= FULL_MATRIX_UP_TO:
        table = Table(title="per-class accuracy and confusion matrix (rows: true class, columns: predicted)")
        table.add_column("class")
        for name in names:
            table.add_column(cell(name), justify="right")
        table.add_column("examples", justify="right")
        table.add_column("accuracy", justify="right")
        for index, result in enumerate(acc.per_class):
            cells = [
                f"[bold]{count}[/]" if column == index else (str(count) if count else "[dim]·[/]")
                for column, count in enumerate(acc.confusion[index])
            ]
            table.add_row(cell(result.name), *cells, f"{result.examples:,}", _accuracy(result.accuracy))
        return table
    table = Table(
        title=f"the {WORST_SHOWN} least accurate of {len(names)} classes (all of them: --json, --confusion-png)"
    )
    for column in ("class", "examples", "accuracy", "most often predicted instead"):
        table.add_column(column, justify="left" if column in ("class", "most often predicted instead") else "right")
    present = [r for r in acc.per_class if r.accuracy is not None]
    for result in sorted(present, key=lambda r: (r.accuracy, r.name))[:WORST_SHOWN]:
        table.add_row(
            cell(result.name), f"{result.examples:,}", _accuracy(result.accuracy), cell(result.confused_with or "")
        )
    return table


def _accuracy(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def compare_table(comparison: CompareReport) -> Table:
    """One column per export mode (refused ones too), one row per figure: size, start, memory, latency and
    throughput at batch 1 and B (with the ratio to dense fp32), accuracy and agreement with float32."""
    first = comparison.rows[0].report
    batch, k = first.batch_size, first.accuracy.k
    table = Table(
        title=f"maskforge eval --compare: {comparison.artifact} ({first.accuracy.data} / "
        f"{first.accuracy.split}, {first.accuracy.examples:,} examples, {first.threads} thread(s))"
    )
    table.add_column("")
    summaries = {row.mode: row.summary() for row in comparison.rows}
    refused = {mode: index + 1 for index, mode in enumerate(comparison.refused)}
    columns = [mode for mode in comparison.modes if mode in summaries or mode in refused] or [*summaries, *refused]
    for mode in columns:
        table.add_column(mode.replace(" ", "\n", 1), justify="right")
    versus = f" (x {comparison.baseline})" if comparison.baseline else ""
    lines = [
        ("file", lambda s: _bytes(s["onnx_bytes"])),
        ("bits / masked weight", lambda s: _number(s["bits_per_weight"], ".3f")),
        ("session start", lambda s: _ms(s["session_start_ms"])),
        ("peak memory", lambda s: _bytes(s["peak_rss_bytes"])),
    ]
    requested = first.timing.runs_requested if first.timing else None
    for size in sorted({1, batch}):
        lines += [
            (f"batch {size}: p50 / p90 / p99 ms", lambda s, b=size: _percentiles(s, b, requested)),
            (f"batch {size}: images/s{versus}", lambda s, b=size: _throughput(s, b)),
        ]
    lines += [
        ("top-1", lambda s: f"{s['top1']:.2%}"),
        (f"top-{k}", lambda s: f"{s[f'top{k}']:.2%}"),
        ("agreement with float32", lambda s: _number(s["argmax_agreement"], ".2%")),
        (
            "Δ top-1 (points)",
            lambda s: _number(None if s["top1_difference"] is None else 100 * s["top1_difference"], "+.2f"),
        ),
    ]
    for label, value_of in lines:
        table.add_row(
            label,
            *[
                value_of(summaries[mode])
                if mode in summaries
                else f"[red]refused ({refused[mode]})[/]"
                if label == "file"
                else ""
                for mode in columns
            ],
        )
    table.caption = f"agreement and Δ top-1 against {comparison.reference}: top-1 {comparison.reference_top1:.2%}"
    return table


def refused_lines(comparison: CompareReport) -> list[str]:
    """The footnotes of `compare_table`: why each refused mode was refused (one line each)."""
    return [f"({index + 1}) {mode}: {why}" for index, (mode, why) in enumerate(comparison.refused.items())]


def _number(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def _percentiles(summary: dict, batch: int, requested: int | None) -> str:
    values = [summary[f"{name}_ms_b{batch}"] for name in ("p50", "p90", "p99")]
    runs = summary[f"runs_b{batch}"]
    short = f" ({runs} runs: time budget)" if requested and runs is not None and runs < requested else ""
    return "n/a" if None in values else " / ".join(f"{v:.3g}" for v in values) + short


def _throughput(summary: dict, batch: int) -> str:
    rate, speedup = summary[f"throughput_b{batch}"], summary[f"speedup_b{batch}"]
    return _rate(rate) + (f" ({speedup:.2f}x)" if speedup is not None else "")


def _rate(value: float | None) -> str:
    return "n/a" if value is None else f"{value:,.0f}"

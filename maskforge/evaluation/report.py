"""The evaluation report: typed sections that the CLI prints and `to_dict()` turns into JSON.

One `EvalReport` per evaluated ONNX model; `CompareReport` holds one `EvalReport` per export mode and
the side-by-side rows. Every number keeps its unit in its name (`_ms`, `_bytes`, `_per_s`); fractions
are in [0, 1]. JSON is written by `write_report`, atomically, creating missing parent folders as `search` creates its
run folder.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..export import ExportResult, check_output_path, output_folder
from ..fileio import atomic_write

REPORT_FORMAT = "maskforge-eval-report"
REPORT_VERSION = 2  # 1: the flat dict of maskforge 0.1 (top5/latency_ms/... at the top level)
SPARSITY_NOTE = (
    "Unstructured sparsity does not speed up dense kernels: onnxruntime and PyTorch run every "
    "weight, zeros included, so latency follows the dense MACs; the effective MACs are what a "
    "sparse kernel could skip."
)
MEMORY_NOTE = (
    "peak_rss_bytes: the resident-set high-water mark of a fresh process that only imports numpy and "
    "onnxruntime, creates the session and runs one batch of 1 and one of the batch size; "
    "model_rss_bytes: that peak minus the process's high-water mark before the session was created "
    "(what the model itself costs: weights, folded constants, onnxruntime's arena)."
)


@dataclass
class ModelSummary:
    """What was evaluated."""

    path: str  # the file given (an artifact or an .onnx file)
    kind: str  # "artifact" | "onnx"
    storage: str | None  # "dense" | "compact" | "regen" (newer values are kept as written); None: unknown
    precision: str | None  # "fp32" | "int8" | ...; None: unknown
    arch: str | None
    k: float | None  # fraction of weights kept
    input_shape: list[int]  # [channels, height, width]
    class_names: list[str]
    preprocessing: str  # "metadata", "given" (mean/std/size passed), or "metadata, overridden"
    notes: list[str] = field(default_factory=list)


@dataclass
class ClassResult:
    """Accuracy of one class on the evaluated split."""

    name: str
    examples: int
    correct: int
    accuracy: float | None  # None when the split has no example of this class
    confused_with: str | None  # the class most often predicted instead (None: never wrong)


@dataclass
class Accuracy:
    """Top-1 and top-k on the evaluated split, per class, and the confusion matrix."""

    data: str
    split: str
    examples: int
    correct: int
    top1: float
    k: int  # min(5, number of classes): "top-5" with 3 classes would be a top-3
    correct_topk: int
    topk: float
    per_class: list[ClassResult]
    confusion: list[list[int]]  # confusion[true][predicted] = examples
    search_heldout_acc: float | None = None  # what the search recorded on this split (provenance)
    #: images of the split that could not be decoded, left out of every count: [{"image", "error"}]
    unreadable: list[dict] = field(default_factory=list)

    @property
    def topk_name(self) -> str:
        return f"top{self.k}"


@dataclass
class Agreement:
    """The evaluated model against a float32 reference on the same examples."""

    reference: str  # what the reference is ("PyTorch, materialized artifact", a file...)
    reference_correct: int
    reference_top1: float
    top1_difference: float  # top1 - reference_top1 (negative: the model lost accuracy)
    argmax_agreement: float  # fraction of examples whose predicted class is the reference's
    max_abs_diff: float  # largest |logit - reference logit| seen


@dataclass
class Latency:
    """Wall-clock time per call at one batch size, after warm-up."""

    runtime: str  # "onnxruntime" | "pytorch"
    batch: int
    runs: int  # timed calls (fewer than asked only when the time budget ran out)
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    images_per_s: float  # batch / p50
    block_p50_ms: list[float] = field(default_factory=list)  # p50 of each alternating block (for ratios)


@dataclass
class Timing:
    """Latency, throughput, session start and peak memory."""

    threads: int
    runs_requested: int
    latency: list[Latency]
    session_start_ms: float | None = None  # median of session_start_runs_ms
    session_start_runs_ms: list[float] = field(default_factory=list)  # session creations in a fresh process
    peak_rss_bytes: int | None = None
    model_rss_bytes: int | None = None
    memory_note: str = MEMORY_NOTE

    def at(self, batch: int, runtime: str = "onnxruntime") -> Latency | None:
        return next((t for t in self.latency if t.batch == batch and t.runtime == runtime), None)


@dataclass
class Size:
    """File sizes, and bits per masked weight (the weights of every Conv/Gemm/MatMul, kept or not)."""

    onnx_bytes: int
    masked_weights: int | None
    onnx_bits_per_weight: float | None
    artifact_bytes: int | None
    artifact_bits_per_weight: float | None
    dense_float32_bytes: int | None  # 4 bytes per masked weight and batch-norm value


@dataclass
class Compute:
    """Parameters and multiply-accumulates per image, from the ONNX graph."""

    params_total: int | None
    params_kept: int | None
    density: float | None
    macs_dense: int | None
    macs_effective: int | None  # macs_dense x density: what a sparse kernel could skip to
    note: str = SPARSITY_NOTE


@dataclass
class EvalReport:
    """Everything `maskforge eval` measured about one model.

    >>> report = evaluate("runs/demo/artifact.onnx")                 # doctest: +SKIP
    >>> report.accuracy.top1, report.timing.at(64).images_per_s      # doctest: +SKIP
    (0.912, 20512.3)
    """

    model: ModelSummary
    accuracy: Accuracy
    size: Size
    compute: Compute
    batch_size: int
    threads: int
    agreement: Agreement | None = None
    timing: Timing | None = None

    def to_dict(self) -> dict:
        out = {"format": REPORT_FORMAT, "format_version": REPORT_VERSION, **asdict(self)}
        accuracy = out["accuracy"]
        accuracy[self.accuracy.topk_name] = accuracy.pop("topk")  # name it for what it is: top3 with 3 classes
        accuracy[f"correct_{self.accuracy.topk_name}"] = accuracy.pop("correct_topk")
        return out


@dataclass
class ModeRow:
    """One export mode in the side-by-side table of `compare`."""

    mode: str  # ExportMode.name: "regen int8"
    report: EvalReport
    export: ExportResult | None = None  # what export_onnx wrote and how its own check came out
    speedup: dict[int, float] = field(default_factory=dict)  # batch -> throughput / the baseline mode's

    def summary(self) -> dict:
        """The flat row (also what benchmarks/deploy.py prints): size, start, memory, speed, accuracy."""
        r = self.report
        row = {
            "mode": self.mode,
            "storage": r.model.storage,
            "precision": r.model.precision,
            "onnx_bytes": r.size.onnx_bytes,
            "bits_per_weight": r.size.onnx_bits_per_weight,
        }
        timing = r.timing
        row["session_start_ms"] = timing.session_start_ms if timing else None
        row["peak_rss_bytes"] = timing.peak_rss_bytes if timing else None
        row["model_rss_bytes"] = timing.model_rss_bytes if timing else None
        for batch in sorted({1, r.batch_size}):
            stats = timing.at(batch) if timing else None
            for name in ("p50", "p90", "p99"):
                row[f"{name}_ms_b{batch}"] = getattr(stats, f"{name}_ms") if stats else None
            row[f"runs_b{batch}"] = stats.runs if stats else None
            row[f"throughput_b{batch}"] = stats.images_per_s if stats else None
            row[f"speedup_b{batch}"] = self.speedup.get(batch)
        row["top1"] = r.accuracy.top1
        row[r.accuracy.topk_name] = r.accuracy.topk
        row["argmax_agreement"] = r.agreement.argmax_agreement if r.agreement else None
        row["top1_difference"] = r.agreement.top1_difference if r.agreement else None
        row["export_seconds"] = self.export.seconds if self.export else None
        row["int8_weight_max_error"] = self.export.int8_weight_max_error if self.export else None
        return row


@dataclass
class CompareReport:
    """Every export mode of one artifact, evaluated on the same examples against the same reference."""

    artifact: str
    reference: str
    reference_top1: float
    rows: list[ModeRow]
    refused: dict[str, str] = field(default_factory=dict)  # mode -> why export_onnx refused it
    baseline: str | None = None  # the mode `speedup` is relative to (dense fp32), when it was measured
    modes: list[str] = field(default_factory=list)  # every mode asked for, measured or refused, in order

    def to_dict(self) -> dict:
        return {
            "format": REPORT_FORMAT + "-compare",
            "format_version": REPORT_VERSION,
            "artifact": self.artifact,
            "reference": self.reference,
            "reference_top1": self.reference_top1,
            "baseline": self.baseline,
            "modes": list(self.modes),
            "rows": [row.summary() for row in self.rows],
            "reports": {row.mode: row.report.to_dict() for row in self.rows},
            "refused": dict(self.refused),
        }


def write_report(report: EvalReport | CompareReport, path: str | os.PathLike) -> Path:
    """Write the report as JSON, atomically; missing parent folders are created (and removed again if the
    write fails), only below a writable folder."""
    path = check_output_path(path, "report")
    with output_folder(path):
        return atomic_write(path, json.dumps(report.to_dict(), indent=2, sort_keys=True) + "\n")

"""Evaluate deployed models in onnxruntime: accuracy, agreement with float32, latency, memory, sizes.

One module per job:

* `subject`    opens the model under test (artifact or ONNX), its preprocessing and export mode;
* `runners`    onnxruntime / PyTorch callables from a normalized batch to logits;
* `scoring`    one pass over a split: top-1, top-k, per-class accuracy, confusion matrix, agreement;
* `timing`     latency and throughput in this process; `probe.py` session start and peak memory in a
               fresh one;
* `footprint`  file sizes, bits per masked weight, parameters and MACs;
* `measure`    `evaluate` (one model) and the steps it shares with `compare` (every export mode);
* `report`     the typed report, its JSON and `write_report`; `figure` the confusion-matrix PNG.

>>> report = evaluate("runs/demo/artifact.onnx", batch_size=64)      # doctest: +SKIP
>>> report.accuracy.top1, report.timing.at(64).p50_ms                 # doctest: +SKIP
(0.912, 3.1)
"""

from .compare import compare
from .measure import COMPARE_LATENCY, SPLITS, LatencyOptions, evaluate
from .figure import save_confusion_png
from .report import (
    Accuracy,
    Agreement,
    ClassResult,
    CompareReport,
    Compute,
    EvalReport,
    Latency,
    ModelSummary,
    ModeRow,
    Size,
    Timing,
    write_report,
)
from .subject import parse_floats
from .timing import latency_stats, median_ratio, probe_footprint, probe_session_starts, time_calls

__all__ = [
    "evaluate",
    "compare",
    "LatencyOptions",
    "COMPARE_LATENCY",
    "SPLITS",
    "EvalReport",
    "CompareReport",
    "ModeRow",
    "ModelSummary",
    "Accuracy",
    "ClassResult",
    "Agreement",
    "Latency",
    "Timing",
    "Size",
    "Compute",
    "write_report",
    "save_confusion_png",
    "parse_floats",
    "time_calls",
    "latency_stats",
    "median_ratio",
    "probe_footprint",
    "probe_session_starts",
]

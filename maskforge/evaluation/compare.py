"""`compare`: export an artifact in every export mode and evaluate them side by side on the same examples.

Each mode (`maskforge.export.EXPORT_MODES`: storage dense|compact|regen x precision fp32|int8) is exported
to a temporary folder by `export_onnx`, checks included; all are scored in one pass over the data against
the materialized artifact (PyTorch, float32) as the reference, timed in alternating blocks (so a varying
background load hits every mode alike, and each mode's speed can be given as a ratio to dense fp32's,
round by round), and probed for session start (all modes taking turns in one fresh process) and peak
memory (a fresh process each). A mode the artifact cannot be exported in (`export_onnx` refuses it:
regen or int8 of kaiming_normal weights, an opset the mode cannot use, an int8 file that fails its
accuracy check) is listed as refused, with the one-line reason.

>>> table = compare("runs/demo/artifact.safetensors")                        # doctest: +SKIP
>>> [(row.mode, round(row.summary()["bits_per_weight"], 2)) for row in table.rows][:2]   # doctest: +SKIP
[('dense fp32', 32.02), ('compact fp32', 1.56)]
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Sequence

from ..errors import MaskforgeError
from ..export import EXPORT_MODES, ExportMode, Int8Options, export_onnx
from ..export.calibration import load_check_images
from ..exportchoices import DEFAULT_CALIBRATION
from ..materialization import materialize
from ..memory import check_network_fits
from .measure import COMPARE_LATENCY, LatencyOptions, Reference, Settings, load_matching_data, measure, split_of
from .report import CompareReport, EvalReport, ModeRow
from .runners import TorchRunner
from .scoring import Progress
from .subject import open_model, open_onnx
from .timing import SESSION_STARTS, median_ratio

BASELINE = ExportMode("dense", "fp32")  # speed ratios are against the plain float32 file


def compare(
    artifact: str | os.PathLike,
    *,
    modes: Sequence[ExportMode] = EXPORT_MODES,
    data: str | None = None,
    split: str = "test",
    batch_size: int = 64,
    threads: int | None = None,
    latency: LatencyOptions | None = COMPARE_LATENCY,
    memory: bool = True,
    session_starts: int = SESSION_STARTS,
    progress: Progress | None = None,
) -> CompareReport:
    """Evaluate the artifact exported in each of `modes`; one row per mode (see `ModeRow.summary`).

    int8 modes calibrate on the training split of the data evaluated on (`data`, default the artifact's
    own). `latency` (`LatencyOptions`; None: not timed): its `rounds` are the alternating timing blocks per
    mode and batch size (the rounds of the speed ratios), its `budget_s` the seconds per mode and batch
    size after which timing stops early (at least 3 calls per block); `session_starts`: session creations
    per mode, the modes taking turns.
    """
    _check_modes(modes)
    settings = Settings.from_options(
        split, batch_size, threads, latency, memory, session_starts, budget_scale=len(modes)
    )
    subject = open_model(artifact)
    if subject.artifact is None:
        raise MaskforgeError(
            f"{artifact} is an ONNX file; comparing export modes needs the artifact they are exported from"
        )
    splits, source = load_matching_data(subject, data)
    dataset = split_of(splits, split, source)
    torch_model = materialize(subject.artifact, threads=settings.threads)
    check_network_fits(
        torch_model, subject.spec, settings.batch_size, f"evaluating {artifact}", "give a smaller --batch-size"
    )
    refused: dict[str, str] = {}
    exports = {}
    check_images = None  # the int8 modes' calibration and check images, loaded (and referenced) once
    with tempfile.TemporaryDirectory(prefix="maskforge-compare-") as workdir:
        subjects = {}
        for index, mode in enumerate(modes):
            if progress is not None:
                progress("exporting", index, len(modes))
            try:
                if mode.precision == "int8" and check_images is None:
                    check_images = load_check_images(subject.artifact, source, DEFAULT_CALIBRATION)
                exports[mode.name] = export_onnx(
                    subject.artifact,
                    Path(workdir) / f"{index}.onnx",
                    storage=mode.storage,
                    precision=mode.precision,
                    opset=mode.opset,
                    model=torch_model,
                    int8=Int8Options(data=source, prepared=check_images),
                )
            except MaskforgeError as exc:
                refused[mode.name] = str(exc)
                continue
            subjects[mode.name] = open_onnx(exports[mode.name].path)
            subjects[mode.name].exported_here = True
        if not subjects:
            raise MaskforgeError(
                f"{artifact} could not be exported in any mode: "
                + "; ".join(f"{name}: {why}" for name, why in refused.items())
            )
        ref = Reference(TorchRunner(torch_model), "PyTorch, the materialized artifact (float32)")
        reports = measure(subjects, ref, dataset, source, settings, progress, artifact=subject)
    baseline = reports.get(BASELINE.name)
    rows = [ModeRow(name, report, exports[name], _speedups(report, baseline)) for name, report in reports.items()]
    for row in rows:
        row.report.model.path = f"{artifact} ({row.mode})"
    first = rows[0].report.agreement
    return CompareReport(
        artifact=str(artifact),
        reference=first.reference,
        reference_top1=first.reference_top1,
        rows=rows,
        refused=refused,
        baseline=BASELINE.name if baseline is not None else None,
        modes=[mode.name for mode in modes],
    )


def _check_modes(modes: Sequence[ExportMode]) -> None:
    if not modes:
        raise MaskforgeError("no export modes to compare")
    names = [mode.name for mode in modes]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise MaskforgeError(f"export mode {repeated[0]} is listed twice")


def _speedups(report: EvalReport, baseline: EvalReport | None) -> dict[int, float]:
    """Throughput relative to the baseline's at each batch size: the median over timing rounds of
    baseline p50 / this p50 in the same round."""
    if report.timing is None or baseline is None or baseline.timing is None:
        return {}
    out = {}
    for stats in report.timing.latency:
        base = baseline.timing.at(stats.batch, stats.runtime)
        ratio = median_ratio(base.block_p50_ms, stats.block_p50_ms) if base is not None else None
        if stats.runtime == "onnxruntime" and ratio is not None:
            out[stats.batch] = ratio
    return out

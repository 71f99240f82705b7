"""`compare`: export an artifact in every mode and evaluate them side by side on the same examples.

Each mode is exported to a temporary folder, all are scored in one pass over the data against the
materialized artifact (PyTorch, float32) as the reference, timed in alternating blocks (so a varying
background load hits every mode alike) and probed for session start and peak memory in fresh processes.
A mode the artifact cannot be exported in (refused by `export_onnx`) is listed with the reason.

>>> table = compare("runs/demo/artifact.safetensors")                  # doctest: +SKIP
>>> [(row.mode, row.summary()["bits_per_weight"]) for row in table.rows]   # doctest: +SKIP
[('dense', 32.1), ('compact', 1.69)]
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import MaskforgeError
from ..export import export_onnx
from ..materialize import materialize
from .measure import Reference, Settings, load_matching_data, measure, split_of
from .report import CompareReport, ModeRow
from .runners import TorchRunner
from .scoring import Progress
from .subject import open_model, open_onnx


@dataclass(frozen=True)
class ExportMode:
    """One way to export: a name for the table and the keyword arguments of `export_onnx`."""

    name: str
    options: dict = field(default_factory=dict)


# Every mode `export_onnx` offers, in table order. Once export takes storage= and precision=, this is:
# EXPORT_MODES = tuple(ExportMode(f"{s}-{p}", {"storage": s, "precision": p})
#                      for s in ("dense", "compact", "regen") for p in ("fp32", "int8"))
EXPORT_MODES = (ExportMode("dense", {"compact": False}), ExportMode("compact", {"compact": True}))


def compare(artifact: str | os.PathLike, *, modes: tuple[ExportMode, ...] = EXPORT_MODES, data: str | None = None,
            split: str = "test", batch_size: int = 64, threads: int | None = None, latency: bool = True,
            latency_runs: int = 30, warmup: int = 3, latency_budget_s: float = 10.0, memory: bool = True,
            progress: Progress | None = None) -> CompareReport:
    """Evaluate the artifact exported in each of `modes`; one row per mode (see `ModeRow.summary`)."""
    settings = Settings.check(split, batch_size, threads, latency, latency_runs, warmup, latency_budget_s, memory)
    subject = open_model(artifact)
    if subject.artifact is None:
        raise MaskforgeError(f"{artifact} is an ONNX file; comparing export modes needs the artifact they are "
                             f"exported from")
    if not modes:
        raise MaskforgeError("no export modes to compare")
    splits, source = load_matching_data(subject, data)
    dataset = split_of(splits, split, source)
    torch_model = materialize(subject.artifact, threads=settings.threads)
    refused: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="maskforge-compare-") as workdir:
        subjects = {}
        for index, mode in enumerate(modes):
            if progress is not None:
                progress("exporting", index, len(modes))
            try:
                exported = export_onnx(subject.artifact, Path(workdir) / f"{index}.onnx", model=torch_model,
                                       **mode.options)
            except MaskforgeError as exc:
                refused[mode.name] = str(exc)
                continue
            subjects[mode.name] = open_onnx(exported.path)
            subjects[mode.name].exported_here = True
        if not subjects:
            raise MaskforgeError(f"{artifact} could not be exported in any mode: "
                                 + "; ".join(f"{name}: {why}" for name, why in refused.items()))
        ref = Reference(TorchRunner(torch_model), "PyTorch, the materialized artifact (float32)")
        reports = measure(subjects, ref, dataset, source, settings, progress, artifact=subject)
    rows = [ModeRow(name, report) for name, report in reports.items()]
    for row in rows:
        row.report.model.path = f"{artifact} ({row.mode})"
    first = rows[0].report.agreement
    return CompareReport(artifact=str(artifact), reference=first.reference, reference_top1=first.reference_top1,
                      rows=rows, refused=refused)

"""`evaluate`: one model in onnxruntime on a data split; `measure`: the steps `evaluate` and `compare` share.

An artifact is exported (default export mode) to a temporary folder and evaluated there, with the
materialized PyTorch model beside it as the float32 reference on the same batches; an ONNX file is
evaluated alone, or against `reference` (the artifact or the float32 ONNX file) when given.
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ..data import DataSplits, ImageFileDataset, check_heldout_data, iterate_batches, normalize
from ..errors import MaskforgeError
from ..export import META_PREFIX, export_onnx
from ..export.calibration import matching_splits, searched_data
from ..materialization import materialize
from ..memory import check_network_fits
from .footprint import compute_section, size_section
from .report import EvalReport, Latency, ModelSummary, Timing
from .runners import OnnxRunner, TorchRunner, torch_threads
from .scoring import Progress, Runner, accuracy_section, agreement_section, score
from .subject import Subject, open_model, open_onnx, preprocessing_overrides
from .timing import SESSION_STARTS, latency_stats, measure_latency, probe_footprints, probe_session_starts

SPLITS = {"test": "heldout", "heldout": "heldout", "val": "heldout", "train": "train"}
REFERENCE = "reference"  # the runner name of the float32 reference
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LatencyOptions:
    """How `evaluate` and `compare` time a model (their `latency=None`: not timed)."""

    runs: int = 30  # timed runs per batch size, after `warmup` untimed ones
    warmup: int = 3
    budget_s: float = 10.0  # seconds per model and batch size after which timing stops early (>= 3 calls a block)
    rounds: int = 2  # alternating timing blocks per model and batch size (the rounds of speed ratios)


#: `compare`'s default: more rounds, since its speed ratios are medians over rounds.
COMPARE_LATENCY = LatencyOptions(rounds=5)


@dataclass
class Settings:
    """How to measure (validated once, shared by `evaluate` and `compare`)."""

    split: str
    batch_size: int
    threads: int
    latency: bool
    runs: int
    warmup: int
    budget_s: float
    memory: bool
    rounds: int = 2  # alternating timing blocks per model and batch size
    starts: int = SESSION_STARTS  # session creations per model

    @classmethod
    def check(
        cls,
        split: str,
        batch_size: int,
        threads: int | None,
        latency: bool,
        runs: int,
        warmup: int,
        budget_s: float,
        memory: bool,
        rounds: int = 2,
        starts: int = SESSION_STARTS,
    ) -> "Settings":
        if split not in SPLITS:
            raise MaskforgeError(f"unknown split {split!r}; choose test (the held-out split) or train")
        if isinstance(batch_size, bool) or not (isinstance(batch_size, int) and batch_size >= 1):
            raise MaskforgeError(f"batch size must be a positive integer, got {batch_size!r}")
        if threads is not None and threads < 1:
            raise MaskforgeError(f"threads must be at least 1, got {threads}")
        if latency and runs < 1:
            raise MaskforgeError(f"latency runs must be at least 1, got {runs}")
        if latency and rounds < 1:
            raise MaskforgeError(f"latency rounds must be at least 1, got {rounds}")
        if latency and memory and starts < 1:
            raise MaskforgeError(f"session starts must be at least 1, got {starts}")
        return cls(
            split,
            batch_size,
            threads or os.cpu_count() or 1,
            latency,
            runs,
            max(0, warmup),
            budget_s,
            memory,
            rounds,
            starts,
        )

    @classmethod
    def from_options(
        cls,
        split: str,
        batch_size: int,
        threads: int | None,
        latency: LatencyOptions | None,
        memory: bool,
        starts: int = SESSION_STARTS,
        budget_scale: int = 1,
    ) -> "Settings":
        timing = latency or LatencyOptions()
        return cls.check(
            split,
            batch_size,
            threads,
            latency is not None,
            timing.runs,
            timing.warmup,
            timing.budget_s * budget_scale,
            memory,
            timing.rounds,
            starts,
        )


@dataclass
class Reference:
    """The float32 model the evaluated one is compared with."""

    runner: Runner
    description: str
    timed: bool = False  # measure its latency beside onnxruntime's (PyTorch eager, for an artifact)


def evaluate(
    model: str | os.PathLike,
    *,
    data: str | None = None,
    split: str = "test",
    batch_size: int = 64,
    threads: int | None = None,
    mean: Sequence[float] | str | None = None,
    std: Sequence[float] | str | None = None,
    size: int | None = None,
    reference: str | os.PathLike | None = None,
    latency: LatencyOptions | None = LatencyOptions(),
    memory: bool = True,
    progress: Progress | None = None,
) -> EvalReport:
    """Stream `split` of `data` through onnxruntime and return the report.

    `model` is an `.onnx` file or an artifact. `data` defaults to the data set named in the model's
    provenance, else the built-in `mnist5k`. `reference` (an artifact or a float32 ONNX file; implied
    for an artifact) adds argmax agreement and the top-1 difference. `threads` sets onnxruntime's and
    PyTorch's intra-op threads (default: all cores). `latency` says how latency is timed (None: not at
    all); `memory` measures session start and peak memory in a child process. `progress(stage, done, total)` is called as work advances.

    >>> report = evaluate("runs/demo/artifact.onnx", batch_size=64)            # doctest: +SKIP
    >>> report.accuracy.top1, report.timing.at(64).p50_ms                      # doctest: +SKIP
    (0.912, 3.1)
    """
    settings = Settings.from_options(split, batch_size, threads, latency, memory)
    subject = open_model(model, mean=mean, std=std, size=size)
    splits, source = load_matching_data(subject, data)  # before any export: mismatches fail fast
    dataset = split_of(splits, split, source)
    with tempfile.TemporaryDirectory(prefix="maskforge-eval-") as workdir:
        evaluated, ref = subject, None
        if subject.artifact is not None:
            torch_model = materialize(subject.artifact, threads=settings.threads)
            check_network_fits(
                torch_model, subject.spec, settings.batch_size, f"evaluating {model}", "give a smaller --batch-size"
            )
            exported = export_onnx(subject.artifact, Path(workdir) / "model.onnx", model=torch_model)
            evaluated = open_onnx(exported.path, preprocessing_overrides(mean, std, size))
            evaluated.exported_here = True
            ref = Reference(TorchRunner(torch_model), "PyTorch, the materialized artifact", timed=True)
        if reference is not None:
            ref = open_reference(reference, subject, settings.threads)
        reports = measure(
            {"model": evaluated},
            ref,
            dataset,
            source,
            settings,
            progress,
            artifact=subject if subject.artifact is not None else None,
        )
    report = reports["model"]
    report.model.path, report.model.kind = str(subject.path), subject.kind
    return report


def split_of(splits: DataSplits, split: str, source: str):
    dataset = getattr(splits, SPLITS[split])
    if len(dataset) == 0:
        raise MaskforgeError(f"the {split} split of {source} is empty")
    return dataset


def open_reference(path: str | os.PathLike, subject: Subject, threads: int) -> Reference:
    """The artifact (materialized, PyTorch) or float32 ONNX file to compare `subject` with."""
    try:
        other = open_model(path)
    except MaskforgeError:
        if subject.names_known:
            raise
        # a reference without metadata, beside a model without metadata: both take the preprocessing given
        other = open_model(path, mean=subject.spec.mean, std=subject.spec.std, size=subject.spec.height)
    got, want = other.spec, subject.spec
    if (got.channels, got.height, got.width, got.num_classes) != (
        want.channels,
        want.height,
        want.width,
        want.num_classes,
    ):
        raise MaskforgeError(
            f"reference {path} takes {got.channels}x{got.height}x{got.width} images and predicts "
            f"{got.num_classes} classes; the model takes {want.channels}x{want.height}x"
            f"{want.width} and predicts {want.num_classes}"
        )
    if (got.mean, got.std) != (want.mean, want.std):
        raise MaskforgeError(
            f"reference {path} normalizes with mean {list(got.mean)} and std {list(got.std)}, "
            f"the model with {list(want.mean)} and {list(want.std)}: not the same input"
        )
    if other.artifact is not None:
        return Reference(
            TorchRunner(materialize(other.artifact, threads=threads)), f"PyTorch, the materialized artifact {path}"
        )
    return Reference(OnnxRunner(other, threads), f"onnxruntime, {path}")


def measure(
    subjects: dict[str, Subject],
    ref: Reference | None,
    dataset,
    source: str,
    settings: Settings,
    progress: Progress | None,
    artifact: Subject | None = None,
) -> dict[str, EvalReport]:
    """Score every subject (and the reference) in one pass, time them side by side, probe their memory."""
    spec = next(iter(subjects.values())).spec
    runners: dict[str, Callable] = {name: OnnxRunner(subject, settings.threads) for name, subject in subjects.items()}
    if ref is not None:
        runners[REFERENCE] = ref.runner
    tolerant = isinstance(dataset, ImageFileDataset)
    if tolerant:  # a corrupt file in an image folder costs its own example, not the evaluation
        dataset.skip_bad, dataset.unreadable = True, {}
    try:
        with torch_threads(settings.threads):
            scores = score(
                runners, dataset, spec, settings.batch_size, reference=REFERENCE if ref else None, progress=progress
            )
            unreadable = _unreadable(dataset) if tolerant else []
            timings = _timings(subjects, runners, ref, dataset, settings, progress) if settings.latency else {}
    finally:
        if tolerant:
            dataset.skip_bad = False
    provenance = (artifact or next(iter(subjects.values()))).provenance()
    heldout_acc = (
        provenance.get("heldout_acc")
        if SPLITS[settings.split] == "heldout" and provenance.get("data") == source
        else None
    )
    reports = {}
    for name, subject in subjects.items():
        reports[name] = EvalReport(
            model=_summary(subject),
            batch_size=settings.batch_size,
            threads=settings.threads,
            accuracy=accuracy_section(scores[name], spec, source, settings.split, heldout_acc, unreadable),
            agreement=agreement_section(scores[name], scores[REFERENCE], ref.description) if ref else None,
            timing=timings.get(name),
            size=size_section(subject, artifact),
            compute=compute_section(subject, artifact),
        )
    return reports


def _unreadable(dataset: ImageFileDataset) -> list[dict]:
    """The images `score` left out, each logged as a warning; refused when that leaves nothing to count."""
    bad = [{"image": str(dataset.files[index]), "error": error} for index, error in sorted(dataset.unreadable.items())]
    if len(bad) == len(dataset):
        raise MaskforgeError(f"none of the {len(dataset)} images could be decoded; the first: {bad[0]['error']}")
    for entry in bad:
        log.warning("%s (left out of the accuracy)", entry["error"])
    return bad


def _timings(
    subjects: dict[str, Subject],
    runners: dict[str, Callable],
    ref: Reference | None,
    dataset,
    settings: Settings,
    progress: Progress | None,
) -> dict[str, Timing]:
    images, _ = next(iter(iterate_batches(dataset, settings.batch_size, shuffle=False)))
    if len(images) < settings.batch_size:  # a split smaller than the batch: repeat it
        images = images.repeat((settings.batch_size + len(images) - 1) // len(images), 1, 1, 1)
    batch = normalize(images[: settings.batch_size], next(iter(subjects.values())).spec).numpy()
    sizes = sorted({1, settings.batch_size})
    timed = {name: runners[name] for name in subjects}
    if ref is not None and ref.timed:
        timed["pytorch"] = ref.runner
    if progress is not None:
        progress("timing", 0, len(sizes))
    calls = measure_latency(
        timed, batch, sizes, settings.runs, settings.warmup, settings.budget_s, settings.rounds, settings.threads
    )
    out = {}
    for name in subjects:
        latency: list[Latency] = [latency_stats("onnxruntime", size, blocks) for size, blocks in calls[name]]
        if "pytorch" in calls:
            latency += [latency_stats("pytorch", size, blocks) for size, blocks in calls["pytorch"]]
        out[name] = Timing(threads=settings.threads, runs_requested=settings.runs, latency=latency)
    if settings.memory:
        _footprints(subjects, out, batch.shape[1:], sizes, settings, progress)
    return out


def _footprints(
    subjects: dict[str, Subject],
    timings: dict[str, Timing],
    shape: tuple[int, ...],
    sizes: list[int],
    settings: Settings,
    progress: Progress | None,
) -> None:
    """Session starts (all models taking turns in one fresh process), then each model's peak memory (a
    fresh process each: a high-water mark only grows). A probe that fails leaves a note, not an error."""
    if progress is not None:
        progress("memory", 0, len(subjects))
    paths = [subject.onnx_path for subject in subjects.values()]
    starts, why = probe_session_starts(paths, settings.threads, settings.starts)
    footprints = probe_footprints(paths, shape, sizes, settings.threads)
    for (name, subject), (footprint, why_memory) in zip(subjects.items(), footprints):
        timing = timings[name]
        if starts is not None:
            timing.session_start_runs_ms = starts[str(subject.onnx_path)]
            timing.session_start_ms = float(np.median(timing.session_start_runs_ms))
        else:
            subject.notes.append(why)
        if footprint is not None:
            timing.peak_rss_bytes = footprint["peak_rss_bytes"]
            timing.model_rss_bytes = footprint["model_rss_bytes"]
        else:
            subject.notes.append(why_memory)


def _summary(subject: Subject) -> ModelSummary:
    spec = subject.spec
    info = subject.info
    return ModelSummary(
        path=str(subject.path),
        kind=subject.kind,
        storage=subject.storage,
        precision=subject.precision,
        arch=info.metadata.get(f"{META_PREFIX}arch"),
        k=_float(info.metadata.get(f"{META_PREFIX}k")),
        input_shape=[spec.channels, spec.height, spec.width],
        class_names=list(spec.class_names),
        preprocessing=subject.preprocessing,
        notes=list(subject.notes),
    )


def _float(value) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


# --- the data --------------------------------------------------------------------------------------------


def load_matching_data(subject: Subject, data: str | None) -> tuple[DataSplits, str]:
    """The data set to evaluate on, checked against the model's input spec (channels, size, classes); a
    model that does not know its class names (or count) takes the data's."""
    source = data or searched_data(subject.provenance(), "--data (Python: data=...)") or "mnist5k"
    splits = matching_splits(subject.spec, source, check_names=subject.names_known, check_classes=subject.classes_known)
    if not subject.names_known:
        spec = subject.spec
        subject.spec = type(spec)(spec.channels, spec.height, spec.width, spec.mean, spec.std, splits.spec.class_names)
    check_heldout_data(subject.provenance(), splits, source)  # warns if not the data the search held out
    return splits, source

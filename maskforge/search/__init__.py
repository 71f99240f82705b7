"""The edge-popup search: SGD on the scores only, warm-up + cosine schedule, held-out evaluation each epoch.

`search(SearchConfig(...))` is what `maskforge search` runs; `resume(DIR)` is `maskforge search --resume
DIR`. A search reads as its steps, one module each:

1. plan (plan.py): rank 0 checks the run folder (and, to resume, the checkpoint); every rank agrees;
2. prepare (setup.py): load the data, build the seeded model; then the run folder (runfolder.py);
3. setup (setup.py): device, optimizer, schedule, position (restored from the checkpoint), DDP;
4. epochs (train.py): `train_one_epoch` step by step, checkpoints between steps, `end_epoch` evaluates;
5. finalize (runfolder.py): the artifact, identical on every rank, written by rank 0.

Everything that decides the result is a pure function of the config: weights and scores come from the
seed, the batch order from (seed, epoch), augmentation from (seed, epoch, batch, rank). So on CPU the
same arguments give a byte-identical artifact, and a search resumed from its checkpoint gives the
artifact the uninterrupted search would have given, byte for byte (docs/SCALE.md, docs/DETERMINISM.md).
The library draws nothing on a terminal: progress leaves through the `on_step` and `on_epoch` callbacks.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from .. import distributed
from ..artifact import Artifact
from ..distributed import World
from ..schema import RESUME_OVERRIDABLE, SearchConfig
from .device import resolve_device
from .plan import Plan, agree, check_world, plan_fresh, plan_resume
from .runfolder import (ARTIFACT_NAME, CHECKPOINT_NAME, CONFIG_NAME, METRICS_NAME, TIMING_FIELDS, finalize_artifact,
                        prepare_run_folder, read_run_config, save_checkpoint, write_metrics)
from .setup import Session, prepare, setup
from .train import StepProgress, end_epoch, lr_at, start_epoch, train_one_epoch

__all__ = ["search", "resume", "SearchConfig", "SearchResult", "StepProgress", "read_run_config", "prepare",
           "lr_at", "resolve_device", "RESUME_OVERRIDABLE", "TIMING_FIELDS", "ARTIFACT_NAME", "METRICS_NAME",
           "CONFIG_NAME", "CHECKPOINT_NAME",
           # the steps, for other training loops over the same data and schedule (maskforge.dense)
           "Session", "setup", "start_epoch", "train_one_epoch", "end_epoch", "write_metrics"]

OnStep = Callable[[StepProgress], None]
OnEpoch = Callable[[dict], None]


@dataclass
class SearchResult:
    artifact: Artifact                # built on every rank from that rank's model (identical, checked)
    artifact_path: Path
    metrics: list[dict] = field(default_factory=list)
    rank: int = 0                     # under torchrun: this process's rank (only rank 0 wrote the files)
    mask_digest: str = ""             # SHA-256 of this rank's masks (layer names + packed mask bytes)

    @property
    def heldout_acc(self) -> float:
        return self.metrics[-1]["heldout_acc"]


def search(config: SearchConfig, *, on_step: OnStep | None = None, on_epoch: OnEpoch | None = None,
           progress: bool | None = None) -> SearchResult:
    """Run edge-popup and write `<out>/artifact.safetensors`, `metrics.jsonl`, `config.json` and
    `checkpoint.safetensors`. Under torchrun, every process calls this; rank 0 writes the files.

    `on_step(StepProgress)` after every optimizer step and `on_epoch(record)` after every epoch are called
    on rank 0. (`progress` is accepted for older callers and ignored: displays are the caller's.)

    >>> from maskforge import SearchConfig, search
    >>> result = search(SearchConfig(arch="fc", k=0.5, epochs=1, out="runs/fc"))   # doctest: +SKIP
    >>> round(result.heldout_acc, 2)                                                # doctest: +SKIP
    0.9
    """
    world = distributed.detect()
    check_world(config, world)
    return _run(world, lambda: plan_fresh(config), on_step, on_epoch)


def resume(run_dir: str | os.PathLike, overrides: Mapping[str, Any] | None = None, *, on_step: OnStep | None = None,
           on_epoch: OnEpoch | None = None, progress: bool | None = None) -> SearchResult:
    """Continue the search in `run_dir` from its checkpoint, with the arguments recorded in its config.json.

    `overrides` are config fields given again (e.g. on the command line): those in `RESUME_OVERRIDABLE`
    replace the recorded ones, any other must equal the recorded value or the call fails before anything
    is written. The resumed search ends with the artifact the uninterrupted one would have written.

    >>> result = resume("runs/fc", {"workers": 4})                                   # doctest: +SKIP
    """
    world = distributed.detect()
    return _run(world, lambda: plan_resume(Path(run_dir), dict(overrides or {}), world), on_step, on_epoch)


def _run(world: World, plan_fn: Callable[[], Plan], on_step: OnStep | None, on_epoch: OnEpoch | None
         ) -> SearchResult:
    with distributed.process_group(world):
        plan = agree(plan_fn, world)
        splits, model, arch_args = prepare(plan.config)  # a bad argument fails here, before any file exists
        if plan.checkpoint is None:
            prepare_run_folder(plan.config, world)
        session = setup(plan.config, splits, model, arch_args, plan.checkpoint, world)
        with session.accelerator.backend_settings():
            _epochs(session, on_step if world.is_main else None, on_epoch if world.is_main else None)
            artifact, path, digest = finalize_artifact(session)
        return SearchResult(artifact, path, session.metrics, world.rank, digest)


def _epochs(session: Session, on_step: OnStep | None, on_epoch: OnEpoch | None) -> None:
    """Train epoch by epoch from the session's position, checkpointing as configured."""
    config = session.config
    while not session.finished:
        totals = start_epoch(session)
        for progress in train_one_epoch(session, totals):
            if on_step is not None:
                on_step(progress)
            if _checkpoint_due(session):
                save_checkpoint(session, totals.as_row())
        record = end_epoch(session, totals)
        if session.world.is_main:
            write_metrics(config.out, session.metrics)
        save_checkpoint(session, [0.0, 0, 0])
        if on_epoch is not None:
            on_epoch(record)


def _checkpoint_due(session: Session) -> bool:
    """Every `checkpoint_every` global steps, except where the end of the epoch checkpoints anyway."""
    every, position = session.config.checkpoint_every, session.position
    return bool(every) and position.step % every == 0 and position.batch_in_epoch < session.steps_per_epoch \
        and position.step < session.total_steps

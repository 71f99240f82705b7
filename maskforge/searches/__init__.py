"""The edge-popup search: SGD on the scores only, warm-up + cosine schedule, held-out evaluation each epoch.

`search(SearchConfig(...))` is what `maskforge search` runs; `resume(DIR)` is `maskforge search --resume
DIR`. A search reads as its steps, one module each:

1. plan (plan.py): rank 0 checks the run folder (and, to resume, the checkpoint); every rank agrees;
2. prepare (setup.py): load the data, build the seeded model; then the run folder (runfolder.py);
3. setup (setup.py): device, optimizer, schedule, position (restored from the checkpoint), DDP;
4. epochs (train.py): `train_one_epoch` step by step, checkpoints between steps, `end_epoch` evaluates;
5. finalize (runfolder.py): the artifact, identical on every rank, written by rank 0.

Around them: the run folder's lock (lock.py) held by rank 0 for the whole search; SIGINT/SIGTERM handled
by stop.py (checkpoint, then `SearchInterrupted`); what the user is told (notices.py, through `logging`);
metrics as JSON lines, CSV and TensorBoard (../metricfiles.py); folder names and states (folders.py).

Everything that decides the result is a pure function of the config: weights and scores come from the
seed, the batch order from (seed, epoch), augmentation from (seed, epoch, batch, rank). So on CPU the
same arguments give a byte-identical artifact, and a search resumed from its checkpoint gives the
artifact the uninterrupted search would have given, byte for byte (docs/SCALE.md, docs/DETERMINISM.md).
The library draws nothing on a terminal: progress leaves through the `on_step` and `on_epoch` callbacks,
notices and warnings through the `maskforge.searches` logger.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from .. import distributed
from ..artifact import Artifact, load_artifact
from ..distributed import World
from ..errors import MaskforgeError
from ..schema import RESUME_EXTENDABLE, RESUME_OVERRIDABLE, SearchConfig
from . import notices
from .device import resolve_device
from .folders import METRICS_CSV_NAME, TENSORBOARD_DIR
from ..metricfiles import TensorBoardLog, read_metrics, write_metrics
from .plan import Plan, agree, check_world, plan_fresh, plan_resume
from .runfolder import (
    ARTIFACT_NAME,
    CHECKPOINT_NAME,
    CONFIG_NAME,
    METRICS_NAME,
    TIMING_FIELDS,
    finalize_artifact,
    open_run_folder,
    read_run_config,
    record_metrics,
    save_checkpoint,
)
from .setup import Session, prepare, setup
from .stop import SearchInterrupted, StopAgreement, StopSignals
from .train import StepProgress, end_epoch, lr_at, start_epoch, train_one_epoch

__all__ = [
    "search",
    "resume",
    "SearchConfig",
    "SearchResult",
    "SearchInterrupted",
    "StepProgress",
    "read_run_config",
    "prepare",
    "lr_at",
    "resolve_device",
    "RESUME_OVERRIDABLE",
    "RESUME_EXTENDABLE",
    "TIMING_FIELDS",
    "ARTIFACT_NAME",
    "METRICS_NAME",
    "METRICS_CSV_NAME",
    "CONFIG_NAME",
    "CHECKPOINT_NAME",
    "TENSORBOARD_DIR",
    # the steps, for other training loops over the same data and schedule (maskforge.dense)
    "Session",
    "setup",
    "start_epoch",
    "train_one_epoch",
    "end_epoch",
    "write_metrics",
]

OnStep = Callable[[StepProgress], None]
OnEpoch = Callable[[dict], None]


@dataclass
class SearchResult:
    artifact: Artifact  # built on every rank from that rank's model (identical, checked)
    artifact_path: Path
    metrics: list[dict] = field(default_factory=list)
    rank: int = 0  # under torchrun: this process's rank (only rank 0 wrote the files)
    mask_digest: str = ""  # SHA-256 of this rank's masks (layer names + packed mask bytes)
    already_done: bool = False  # the out folder held this very search, finished: nothing ran

    @property
    def heldout_acc(self) -> float:
        return self.metrics[-1]["heldout_acc"]

    @property
    def run_dir(self) -> Path:
        return self.artifact_path.parent


def search(
    config: SearchConfig,
    *,
    on_step: OnStep | None = None,
    on_epoch: OnEpoch | None = None,
    overwrite: bool = False,
    handle_signals: bool = True,
) -> SearchResult:
    """Run edge-popup and write the run folder (`config.out`, default `runs/<arch>-k<k>-s<seed>`, numbered
    when taken): `artifact.safetensors`, `config.json`, `metrics.jsonl`, `metrics.csv` (README.md lists
    every file). Under torchrun, every process calls this; rank 0 writes the files.

    A folder holding an unfinished search with the same arguments is continued from its checkpoint (what a
    torchrun elastic restart needs); one holding the same search finished is already done: nothing runs
    and the result is the folder's (`already_done`). A finished search with other arguments is refused
    unless `overwrite`, which moves its files to `previous-N/` inside it. Another search running in the
    folder is refused (it holds the lock).

    `on_step(StepProgress)` after every optimizer step and `on_epoch(record)` after every epoch are called
    on rank 0. With `handle_signals` (main thread only), SIGINT and SIGTERM stop the search at the next
    step with a checkpoint and raise `SearchInterrupted` (maskforge.searches.stop).

    >>> from maskforge import SearchConfig, search
    >>> result = search(SearchConfig(arch="fc", k=0.5, epochs=1, out="runs/fc"))   # doctest: +SKIP
    >>> round(result.heldout_acc, 2)                                                # doctest: +SKIP
    0.9
    """
    world = distributed.detect()
    check_world(config, world)
    return _run(world, lambda: plan_fresh(config, world, overwrite), on_step, on_epoch, handle_signals)


def resume(
    run_dir: str | os.PathLike,
    overrides: Mapping[str, Any] | None = None,
    *,
    on_step: OnStep | None = None,
    on_epoch: OnEpoch | None = None,
    handle_signals: bool = True,
) -> SearchResult:
    """Continue the search in `run_dir` from its checkpoint, with the arguments recorded in its config.json.

    `overrides` are config fields given again (e.g. on the command line): those in `RESUME_OVERRIDABLE`
    replace the recorded ones; `epochs` and `max_steps` (`RESUME_EXTENDABLE`) may grow, which extends
    the search (a finished one too, if its checkpoint was kept: docs/SCALE.md); any other must equal the
    recorded value or the call fails before anything is written. A resumed search that is not extended
    ends with the artifact the uninterrupted one would have written.

    >>> result = resume("runs/fc", {"workers": 4})                                   # doctest: +SKIP
    """
    world = distributed.detect()
    return _run(
        world, lambda: plan_resume(Path(run_dir), dict(overrides or {}), world), on_step, on_epoch, handle_signals
    )


def _run(
    world: World, plan_fn: Callable[[], Plan], on_step: OnStep | None, on_epoch: OnEpoch | None, handle_signals: bool
) -> SearchResult:
    with distributed.process_group(world), StopSignals(handle_signals) as signals:
        plan = agree(plan_fn, world)
        try:
            if plan.done:
                return _already_done(plan, world)
            signals.run_dir, signals.resumable = Path(plan.config.out), plan.checkpoint is not None
            return _search(
                plan, world, signals, on_step if world.is_main else None, on_epoch if world.is_main else None
            )
        except RuntimeError as exc:
            if world.is_distributed and any(text in str(exc) for text in _PEER_LOST):
                raise MaskforgeError(
                    f"another process of this torchrun job stopped, so this one stops too (torchrun "
                    f"restarts the job if --max-restarts allows; it continues from the "
                    f"checkpoint): {' '.join(str(exc).split())[:300]}"
                ) from None
            raise
        finally:
            plan.release()


def _already_done(plan: Plan, world: World) -> SearchResult:
    """The result of the finished search that `plan.config.out` holds (the same arguments: nothing to run)."""
    path = Path(plan.config.out) / ARTIFACT_NAME
    return SearchResult(load_artifact(path), path, read_metrics(plan.config.out), world.rank, already_done=True)


#: What gloo says when a peer process died in the middle of a collective.
_PEER_LOST = ("Connection closed by peer", "Connection reset by peer")


def _search(
    plan: Plan, world: World, signals: StopSignals, on_step: OnStep | None, on_epoch: OnEpoch | None
) -> SearchResult:
    config = plan.config
    splits, model, arch_args = prepare(config)  # a bad argument fails here, before the folder changes
    warned = False
    if world.is_main:
        notices.data_notices(splits)
        warned = notices.model_notices(model, config, resolve_device(config.device).type)
    open_run_folder(config, world, retire_except=plan.retire, clear=plan.clear_records)
    session = setup(config, splits, model, arch_args, plan.checkpoint, world)
    if world.is_main:
        notices.announce(session, plan.story)
    with session.accelerator.backend_settings(), contextlib.ExitStack() as stack:
        tensorboard = TensorBoardLog(config.out) if config.tensorboard and world.is_main else None
        if tensorboard is not None:
            stack.callback(tensorboard.close)
        cost = notices.CostWatch(session, warned)
        if world.is_main:  # a first signal is answered at once, while the step it waits for runs
            signals.on_first = lambda signum: notices.stopping(signum, cost.step_left())
        signals.training()
        _epochs(session, signals, tensorboard, on_step, on_epoch, cost)
        signals.finishing()
        artifact, path, digest = finalize_artifact(session)
    return SearchResult(artifact, path, session.metrics, world.rank, digest)


def _epochs(
    session: Session,
    signals: StopSignals,
    tensorboard: TensorBoardLog | None,
    on_step: OnStep | None,
    on_epoch: OnEpoch | None,
    cost: notices.CostWatch,
) -> None:
    """Train epoch by epoch from the session's position, checkpointing as configured, until the end or
    until every rank agrees to stop on a signal."""
    stop = StopAgreement(signals, session.world)
    while not session.finished:
        totals = start_epoch(session)
        with contextlib.closing(train_one_epoch(session, totals)) as steps:
            for progress in steps:
                if session.world.is_main:
                    progress.eta_s = cost.after_step()
                if on_step is not None:
                    on_step(progress)
                signum = stop.poll()
                if signum:
                    save_checkpoint(session, totals.as_row())
                    _stopped(session, stop, signum)
                if _checkpoint_due(session):
                    save_checkpoint(session, totals.as_row())
        record = end_epoch(session, totals)
        record_metrics(session)
        if tensorboard is not None:
            tensorboard.add_epoch(record)
        save_checkpoint(session, [0.0, 0, 0])
        if on_epoch is not None:
            on_epoch(record)
        signum = stop.poll()
        if signum and not session.finished:
            _stopped(session, stop, signum)
    stop.close()


def _stopped(session: Session, stop: StopAgreement, signum: int) -> None:
    """Every rank agreed to stop for `signum` and the checkpoint is written: raise `SearchInterrupted`."""
    stop.close()
    raise SearchInterrupted(signum, session.config.out, session.position.step, session.total_steps)


def _checkpoint_due(session: Session) -> bool:
    """Every `checkpoint_every` global steps, except where the end of the epoch checkpoints anyway."""
    every, position = session.config.checkpoint_every, session.position
    return (
        bool(every)
        and position.step % every == 0
        and position.batch_in_epoch < session.steps_per_epoch
        and position.step < session.total_steps
    )

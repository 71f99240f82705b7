"""Planning a search: rank 0 chooses and locks the run folder, reads what it holds, and decides; every
rank gets the verdict.

`plan_fresh(config, world, overwrite)` (a `search`):

* no `out`: the first of `runs/<arch>-k<k>-s<seed>`, `...-2`, ... that is free (empty, or holding only
  the records of a search that never checkpointed), or that holds an unfinished search with the same
  arguments (continued); finished searches and folders locked by a running search are passed over, and
  nothing is ever moved. With `overwrite`, unfinished searches are passed over too.
* an `out`: refused while another search holds its lock; an unfinished search with the same arguments
  is continued from its checkpoint (so a torchrun elastic restart, which reruns the same command line,
  carries on); a finished search with the same arguments is already done (`Plan.done`: nothing runs, the
  result is the folder's, so rerunning a command is harmless); a finished one with other arguments, or an
  unfinished one with other arguments, is refused unless `overwrite`, which moves the folder's files to
  `out/previous-N/` once the new search has loaded its data.

`plan_resume(run, overrides, world)` (a `resume`) reads `config.json` and the checkpoint and checks that
they belong together and to this launch; `epochs`/`max_steps` may grow (extending the search).
`agree(plan_fn, world)` runs either on rank 0 only, so that a bad folder gives every rank the same
one-line error instead of a hang. The plan of rank 0 holds the folder's lock until the search ends.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .. import distributed
from ..convert import trust
from ..data.named import is_named
from ..checkpoint import CHECKPOINT_NAME, Checkpoint, check_compatible, load_checkpoint
from ..distributed import World
from ..errors import MaskforgeError
from ..schema import RESUME_EXTENDABLE, RESUME_OVERRIDABLE, SearchConfig
from .device import resolve_device
from .folders import ARTIFACT_NAME, CONFIG_NAME, KEPT_ON_EXTEND, default_folders, read_state
from .lock import RunLock, RunLocked
from ..metricfiles import check_tensorboard
from .runfolder import identity, read_run_config
from .setup import total_steps

log = logging.getLogger(__name__)


@dataclass
class Plan:
    """What to run: the config, the checkpoint to continue from (None: a fresh search), and on rank 0 the
    folder's lock and what to do with the folder's files before the search starts."""

    config: SearchConfig
    checkpoint: Checkpoint | None = None
    lock: RunLock | None = None
    retire: tuple[str, ...] | None = None  # move every entry but these to previous-N/ (None: move nothing)
    clear_records: bool = False  # remove the records of a search that never checkpointed
    story: str = ""  # what was decided, for the start line
    done: bool = False  # the folder holds this very search, finished: nothing to run

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()


def check_world(config: SearchConfig, world: World) -> None:
    """The global batch must split evenly over the processes."""
    if config.batch_size % world.world_size:
        up = -(-config.batch_size // world.world_size) * world.world_size
        raise MaskforgeError(
            f"batch_size {config.batch_size} is the global batch and must be a multiple of the "
            f"number of processes ({world.world_size}), e.g. {up}"
        )


def normalized(config: SearchConfig) -> SearchConfig:
    """The config with `data` as an absolute path (so that it means the same from any folder); a named
    source (`mnist5k`, `fashion-mnist`) keeps its name, which means the same on every machine."""
    return config.replace(data=absolute_data(config.data))


def absolute_data(data: str) -> str:
    return data if is_named(data) else os.path.abspath(os.path.expanduser(data))


def plan_fresh(config: SearchConfig, world: World | None = None, overwrite: bool = False) -> Plan:
    world = world or World()
    config = normalized(config)
    trust(config.arch)  # the user named this builder: its code may run here
    resolve_device(config.device)
    check_tensorboard(config)
    if config.out is None:
        return _plan_default(config, world, overwrite)
    folder = Path(config.out)
    lock = RunLock.acquire(folder)
    return _holding(lock, lambda: _decide(config, folder, lock, world, overwrite, default=False))


def _plan_default(config: SearchConfig, world: World, overwrite: bool) -> Plan:
    for folder in default_folders(config):
        try:
            lock = RunLock.acquire(folder)
        except RunLocked:
            continue  # a search is running there
        # the lambda runs inside _holding, within this iteration: the loop variables are the current ones
        plan = _holding(
            lock,
            lambda: _decide(config.replace(out=str(folder)), folder, lock, world, overwrite, default=True),  # noqa: B023
        )
        if plan is not None:
            return plan
        lock.release()
    raise MaskforgeError(f"no free run folder among {next(default_folders(config))}-N; choose an out folder")


def _holding(lock: RunLock, decide: Callable[[], Plan | None]) -> Plan | None:
    """`decide()` while holding `lock`; on an error the lock is released (and the folder left as it was)."""
    try:
        return decide()
    except BaseException:
        lock.release()
        raise


def _decide(
    config: SearchConfig, folder: Path, lock: RunLock, world: World, overwrite: bool, *, default: bool
) -> Plan | None:
    """The plan for `folder` given what it holds; None where a default folder is to be passed over."""
    state = read_state(folder)
    if state.kind == "empty":
        return Plan(config, lock=lock)
    if state.kind == "started":
        return Plan(config, lock=lock, clear_records=True)
    differing = state.differing(config)
    if state.kind == "unfinished" and not differing and not overwrite:
        given = {key: getattr(config, key) for key in RESUME_OVERRIDABLE}
        try:
            plan = plan_resume(folder, given, world, lock=lock)
        except MaskforgeError as exc:
            if not default:
                raise
            log.info("passing over %s: %s", folder, exc)
            return None
        plan.story = f"continuing the unfinished search in {folder} (same arguments) from its checkpoint"
        return plan
    if default:
        return None
    if state.kind == "finished" and not differing and not overwrite:
        return Plan(config, lock=lock, done=True)
    if overwrite:
        return Plan(config, lock=lock, retire=(), story=f"replacing the {state.kind} search in {folder} (overwrite)")
    if state.kind == "finished":
        raise MaskforgeError(
            f"{folder} holds a finished search ({ARTIFACT_NAME}) with other arguments "
            f"({'; '.join(differing)}): choose another folder with --out, leave --out out to "
            f"get a new numbered one, or add --overwrite to replace it (its files move to "
            f"{folder}/previous-N)"
        )
    raise MaskforgeError(
        f"{folder} holds an unfinished search with other arguments ({'; '.join(differing)}): "
        f"continue it with --resume {folder}, add --overwrite to replace it (its files move to "
        f"{folder}/previous-N), or choose another folder with --out"
    )


def plan_resume(run: Path, overrides: dict, world: World, lock: RunLock | None = None) -> Plan:
    if not run.is_dir():
        raise MaskforgeError(f"cannot resume {run}: no such run folder")
    if not os.access(run, os.W_OK | os.X_OK):
        raise MaskforgeError(f"run folder {run} is not writable")
    lock = lock or RunLock.acquire(run, create=False)
    return _holding(lock, lambda: _plan_resume(run, overrides, world, lock))


def _plan_resume(run: Path, overrides: dict, world: World, lock: RunLock) -> Plan:
    recorded = read_run_config(run).to_dict()
    values = _resumed_values(run, dict(recorded), overrides)
    config = SearchConfig.from_dict(values, f"resume of {run}")
    trust(config.arch)  # the user resumes this search: its builder's code may run here
    resolve_device(config.device)
    check_world(config, world)
    check_tensorboard(config)
    path = run / CHECKPOINT_NAME
    state = read_state(run)
    if state.kind == "finished" and not path.exists():
        raise MaskforgeError(_finished_without_checkpoint(run, values, recorded))
    checkpoint = load_checkpoint(path)
    check_compatible(checkpoint, identity(config), f"checkpoint {path}")
    written = checkpoint.meta.config.to_dict()
    differing = sorted(
        key
        for key in written
        if key not in RESUME_OVERRIDABLE + RESUME_EXTENDABLE + ("out",) and written[key] != values[key]
    )
    if differing:
        raise MaskforgeError(
            f"checkpoint {path} was written by a search with other arguments than "
            f"{run / CONFIG_NAME} records (differing: {', '.join(differing)})"
        )
    written_by = checkpoint.meta.world_size
    if written_by != world.world_size:
        raise MaskforgeError(
            f"checkpoint {path} was written by {written_by} process(es); resume it with "
            f"{written_by} (now {world.world_size}) so the batch order continues exactly"
        )
    position = checkpoint.position
    total = total_steps(config, position["steps_per_epoch"])
    if total < position["step"]:
        raise MaskforgeError(
            f"resume of {run}: epochs {config.epochs} and max_steps {config.max_steps} make "
            f"{total} steps, but the checkpoint is at step {position['step']}; a search can "
            f"be extended, not shortened"
        )
    extended = total != position["total_steps"]
    cut_epoch = position["epoch"] * position["steps_per_epoch"] > position["step"]
    if extended and cut_epoch:
        # max_steps ended the search inside an epoch, and its checkpoint already counts that epoch as done:
        # continuing would skip the rest of it (or, with no epoch left, train nothing).
        raise MaskforgeError(
            f"cannot extend the search in {run}: max_steps {position['total_steps']} ended it "
            f"inside epoch {position['epoch']}, and a search is extended only from the end of "
            f"an epoch; start a new search with these arguments instead"
        )
    retire = KEPT_ON_EXTEND if extended and state.kind == "finished" else None
    story = (
        f"extending the search in {run} from {position['total_steps']} to {total} steps"
        if extended
        else f"resuming the search in {run}"
    )
    return Plan(config, checkpoint, lock, retire=retire, story=story)


def _finished_without_checkpoint(run: Path, values: dict, recorded: dict) -> str:
    longer = [f"{key} {values[key]}" for key in RESUME_EXTENDABLE if values[key] != recorded[key]]
    if longer:
        return (
            f"cannot extend the finished search in {run} to {', '.join(longer)}: its checkpoint was removed "
            f"when it finished (keep_checkpoint keeps it), and the artifact holds the masks but not the "
            f"scores and momentum a search continues from; start a new search with these arguments instead"
        )
    return (
        f"{run} holds a finished search ({ARTIFACT_NAME}): nothing to resume (its checkpoint was removed "
        f"when it finished; keep_checkpoint keeps it for extending a search)"
    )


def _resumed_values(run: Path, values: dict, overrides: dict) -> dict:
    """The recorded arguments with the operational overrides (and longer epochs/max_steps) applied; any
    other override must repeat the recorded value."""
    conflicts = []
    for key, value in overrides.items():
        if key not in values:
            raise MaskforgeError(f"unknown search config field {key!r}")
        if key == "out":
            if Path(value).resolve() != run.resolve():
                conflicts.append(f"out {value} (the run folder is {run})")
        elif key in RESUME_OVERRIDABLE + RESUME_EXTENDABLE:
            values[key] = value
        elif key == "data" and absolute_data(value) == values[key]:
            continue
        elif value != values[key]:
            conflicts.append(f"{key} {value} (recorded: {values[key]})")
    if conflicts:
        raise MaskforgeError(
            f"resume of {run}: {'; '.join(conflicts)} conflict with the arguments recorded in "
            f"{run / CONFIG_NAME}; leave them out to continue with the recorded ones"
        )
    values["out"] = str(run)
    return values


def agree(plan_fn: Callable[[], Plan], world: World) -> Plan:
    """Run `plan_fn` on rank 0 and give every rank its config (and checkpoint document), or its error."""
    plans: list[Plan] = []

    def plan_on_main():
        plan = plan_fn()
        plans.append(plan)
        ckpt = plan.checkpoint
        return (plan.config.to_dict(), ckpt.document if ckpt else None, sorted(ckpt.tensors) if ckpt else None)

    try:
        config, document, names = distributed.run_on_main(plan_on_main, world, " while preparing the search")
    except BaseException:
        for plan in plans:
            plan.release()
        raise
    if plans:  # rank 0 (or a single process) keeps its own plan, tensors included
        return plans[0]
    # Other ranks know the checkpoint's document and tensor names; the tensors come by broadcast.
    return Plan(SearchConfig.from_dict(config), Checkpoint(document, dict.fromkeys(names)) if document else None)

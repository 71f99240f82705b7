"""Planning a search: rank 0 reads and validates the run folder, every rank gets the verdict.

`plan_fresh(config)` refuses to overwrite an interrupted search; `plan_resume(run, overrides, world)`
reads `config.json` and the checkpoint and checks that they belong together and to this launch.
`agree(plan_fn, world)` runs either on rank 0 only, so that a bad folder gives every rank the same
one-line error instead of a hang.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .. import distributed
from ..checkpoint import CHECKPOINT_NAME, Checkpoint, check_compatible, load_checkpoint, read_position
from ..distributed import World
from ..errors import MaskforgeError
from ..schema import RESUME_OVERRIDABLE, SearchConfig
from .device import resolve_device
from .runfolder import CONFIG_NAME, identity, read_run_config


@dataclass
class Plan:
    """What to run: the config, and the checkpoint to continue from (None: a fresh search)."""

    config: SearchConfig
    checkpoint: Checkpoint | None = None


def check_world(config: SearchConfig, world: World) -> None:
    """The global batch must split evenly over the processes."""
    if config.batch_size % world.world_size:
        up = -(-config.batch_size // world.world_size) * world.world_size
        raise MaskforgeError(f"batch_size {config.batch_size} is the global batch and must be a multiple of the "
                             f"number of processes ({world.world_size}), e.g. {up}")


def plan_fresh(config: SearchConfig) -> Plan:
    resolve_device(config.device)
    position = read_position(Path(config.out) / CHECKPOINT_NAME)
    if position is not None and position["step"] < position["total_steps"]:
        # Starting over would overwrite an interrupted search that could still be continued.
        raise MaskforgeError(f"{config.out} holds an unfinished search (checkpoint at step {position['step']} of "
                             f"{position['total_steps']}): resume it, or choose another out folder (or delete "
                             f"this one) to start a new search")
    return Plan(config)


def plan_resume(run: Path, overrides: dict, world: World) -> Plan:
    if not run.is_dir():
        raise MaskforgeError(f"cannot resume {run}: no such run folder")
    values = _resumed_values(run, read_run_config(run).to_dict(), overrides)
    config = SearchConfig.from_dict(values, f"resume of {run}")
    resolve_device(config.device)
    check_world(config, world)
    if not os.access(run, os.W_OK | os.X_OK):
        raise MaskforgeError(f"run folder {run} is not writable")
    path = run / CHECKPOINT_NAME
    checkpoint = load_checkpoint(path)
    check_compatible(checkpoint, identity(config), f"checkpoint {path}")
    recorded = checkpoint.meta.config.to_dict()
    differing = sorted(key for key in recorded
                       if key not in RESUME_OVERRIDABLE + ("out",) and recorded[key] != values[key])
    if differing:
        raise MaskforgeError(f"checkpoint {path} was written by a search with other arguments than "
                             f"{run / CONFIG_NAME} records (differing: {', '.join(differing)})")
    written_by = checkpoint.meta.world_size
    if written_by != world.world_size:
        raise MaskforgeError(f"checkpoint {path} was written by {written_by} process(es); resume it with "
                             f"{written_by} (now {world.world_size}) so the batch order continues exactly")
    return Plan(config, checkpoint)


def _resumed_values(run: Path, values: dict, overrides: dict) -> dict:
    """The recorded arguments with the operational overrides applied; any other override must repeat the
    recorded value."""
    conflicts = []
    for key, value in overrides.items():
        if key not in values:
            raise MaskforgeError(f"unknown search config field {key!r}")
        if key == "out":
            if Path(value).resolve() != run.resolve():
                conflicts.append(f"out {value} (the run folder is {run})")
        elif key in RESUME_OVERRIDABLE:
            values[key] = value
        elif value != values[key]:
            conflicts.append(f"{key} {value} (recorded: {values[key]})")
    if conflicts:
        raise MaskforgeError(f"resume of {run}: {'; '.join(conflicts)} conflict with the arguments recorded in "
                             f"{run / CONFIG_NAME}; leave them out to continue with the recorded ones")
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

    config, document, names = distributed.run_on_main(plan_on_main, world, " while preparing the search")
    if plans:  # rank 0 (or a single process) keeps its own plan, tensors included
        return plans[0]
    # Other ranks know the checkpoint's document and tensor names; the tensors come by broadcast.
    return Plan(SearchConfig.from_dict(config), Checkpoint(document, dict.fromkeys(names)) if document else None)

"""Setting a search up: the seeded model on its device, the optimizer, the schedule and the position.

`prepare(config)` loads the data and builds the seeded model (nothing is written, nothing moves to a
device); `setup(...)` makes the `Session` the training steps work on, restoring a checkpoint's state
when resuming. Under torchrun the model is wrapped in DistributedDataParallel over the scores.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import os
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import archs, convert, distributed
from ..checkpoint import Checkpoint, restore
from ..data import DataSplits, augment_batch, iterate_batches, load_data, num_batches
from ..distributed import World
from ..errors import MaskforgeError
from ..layers import batchnorm_modules, masked_modules, set_masker, set_topk
from ..schema import SearchConfig
from .device import Accelerator, resolve_device


@dataclass
class Position:
    """Where the search stands: the epoch being run (0-based), batches of it done, optimizer steps done."""

    epoch: int = 0
    batch_in_epoch: int = 0
    step: int = 0


@dataclass
class Session:
    """Everything the training steps need, built once by `setup`."""

    config: SearchConfig
    world: World
    accelerator: Accelerator
    splits: DataSplits
    model: nn.Module  # the plain model (what checkpoints and the artifact capture)
    train_model: nn.Module  # the model the steps call: DDP- and/or compile-wrapped
    optimizer: torch.optim.Optimizer
    arch_args: dict
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    workers: int
    position: Position = field(default_factory=Position)
    metrics: list[dict] = field(default_factory=list)
    # This rank's running train sums of the current epoch: loss sum, correct, seen.
    epoch_sums: list = field(default_factory=lambda: [0.0, 0, 0])
    # A builder reference's library and structure at search start (convert.builder_record; {} for a
    # registered name): every checkpoint and the artifact record it, and a resume compares the code with it.
    builder: dict = field(default_factory=dict)

    @property
    def bn_stats(self) -> list[torch.Tensor]:
        return [
            t
            for bn in batchnorm_modules(self.model).values()
            for t in (bn.running_mean, bn.running_var)
            if t is not None
        ]

    @property
    def finished(self) -> bool:
        return self.position.step >= self.total_steps or self.position.epoch >= self.config.epochs


def prepare(config: SearchConfig) -> tuple[DataSplits, nn.Module, dict]:
    """Check the computing choices, load the data and build the seeded model with its top-k rule (nothing
    is written, nothing moves to a device). Returns (splits, model, arch args).

    Everything that can refuse a search refuses here, before the run folder is touched: the device, bf16
    or compile where the machine lacks them, and (with `deterministic`) an operation without a
    deterministic kernel, found by one probing training step on a copy of the model."""
    device = _current(resolve_device(config.device))
    Accelerator.check(config, device)
    splits = load_data(config.data, image_size=config.image_size)
    spec = splits.spec
    convert.trust(config.arch)  # the user named this builder: its code may run in this process
    args = archs.arch_args(
        spec.channels, spec.num_classes, (spec.height, spec.width), builder_args=config.builder_args()
    )
    if config.width is not None and config.width != 1:
        args["width"] = config.width  # an architecture argument: recorded in the artifact's arch.args
    model = archs.create_model(
        config.arch, **args, k=config.k, seed=config.seed, init=config.init, scale_fan=config.scale_fan
    )
    if config.topk != "layer":
        set_topk(model, config.topk, config.k)
    if config.deterministic:
        _probe_determinism(config, splits, model, Accelerator.resolve(config, device, model))
    return splits, model, args


def setup(
    config: SearchConfig,
    splits: DataSplits,
    model: nn.Module,
    arch_args: dict,
    checkpoint: Checkpoint | None,
    world: World,
) -> Session:
    """The session of a fresh search, or of a resumed one at its checkpoint's position."""
    device = distributed.local_device(world, resolve_device(config.device).type)
    accelerator = Accelerator.resolve(config, device, model)
    set_masker(model, accelerator.masker)
    accelerator.prepare_model(model)
    scores = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(scores, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    steps_per_epoch = num_batches(len(splits.train), config.batch_size)  # the last batch may be short
    session = Session(
        config,
        world,
        accelerator,
        splits,
        model,
        model,
        optimizer,
        arch_args,
        steps_per_epoch,
        total_steps(config, steps_per_epoch),
        config.warmup_epochs * steps_per_epoch,
        _workers(config, world),
    )
    session.builder = _builder_record(config, arch_args, checkpoint)
    if checkpoint is not None:
        _resume_from(session, checkpoint)
    session.train_model = _wrap(model, config, world, device)
    return session


def total_steps(config: SearchConfig, steps_per_epoch: int) -> int:
    """Optimizer steps of a search: every epoch's, up to `max_steps` (the plan's checks use it too)."""
    total = steps_per_epoch * config.epochs
    return total if config.max_steps is None else min(total, config.max_steps)


def _current(device: torch.device) -> torch.device:
    """`cuda` as the current CUDA device (under torchrun: this process's), anything else as it is."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def _probe_determinism(config: SearchConfig, splits: DataSplits, model: nn.Module, accelerator: Accelerator) -> None:
    """One training forward and backward of a copy of `model` on two training images, under the search's
    deterministic settings: an operation without a deterministic kernel fails here (a MaskforgeError
    naming it, from `backend_settings`) instead of at the first step, after the run folder was written."""
    probe = accelerator.prepare_model(copy.deepcopy(model))
    set_masker(probe, accelerator.masker)
    probe.train()
    with contextlib.closing(iterate_batches(splits.train, min(2, len(splits.train)), shuffle=False)) as batches:
        images, labels = next(batches)
    images, labels = images.to(accelerator.device), labels.to(accelerator.device)
    with accelerator.backend_settings():
        if splits.augment:
            images = augment_batch(images, torch.Generator(device=images.device).manual_seed(0))
        with accelerator.autocast():
            logits = probe(accelerator.inputs(images, splits.spec))
            loss = F.cross_entropy(logits.float(), labels, label_smoothing=config.label_smoothing)
        loss.backward()


def _builder_record(config: SearchConfig, arch_args: dict, checkpoint: Checkpoint | None) -> dict:
    """The record of the search's start: a resumed search keeps its checkpoint's (the plan checked that the
    code still builds it); a fresh one, or a checkpoint from before the record, takes the code's now."""
    identity = checkpoint.identity if checkpoint is not None else None
    if identity is not None and identity.structure is not None:
        record = {
            "library": identity.library,
            "structure": list(identity.structure),
            "structure_digest": identity.structure_digest,
        }
        if identity.calls is not None:  # checkpoints from before the call listing have none
            record.update(calls=list(identity.calls), calls_digest=identity.calls_digest)
        return record
    return convert.builder_record(config.arch, arch_args)


def _resume_from(session: Session, checkpoint: Checkpoint) -> None:
    recorded_args = checkpoint.identity.arch_args.to_dict()
    if recorded_args != session.arch_args:
        raise MaskforgeError(
            f"the data {session.config.data} now gives a network with {session.arch_args}, but "
            f"the checkpoint was written for {recorded_args}"
        )
    position = checkpoint.position
    # total_steps may differ: an extended search (the plan checked that it does not shrink below the step).
    if position["steps_per_epoch"] != session.steps_per_epoch:
        raise MaskforgeError(
            f"the checkpoint expects {position['steps_per_epoch']} steps per epoch and "
            f"{position['total_steps']} in all, this data gives {session.steps_per_epoch} and "
            f"{session.total_steps}"
        )
    _restore_everywhere(checkpoint, session.model, session.optimizer, session.world)
    session.position = Position(position["epoch"], position["batch_in_epoch"], position["step"])
    session.metrics = [dict(record) for record in checkpoint.document["metrics"]]
    session.epoch_sums = list(checkpoint.document["train_sums"][session.world.rank])


def _restore_everywhere(
    checkpoint: Checkpoint, model: nn.Module, optimizer: torch.optim.Optimizer, world: World
) -> None:
    """Rank 0 loads the checkpoint's tensors; every other rank receives them by broadcast."""
    if world.is_main:
        restore(checkpoint, model, optimizer)
    if not world.is_distributed:
        return
    has_momentum = any(name.startswith("momentum/") for name in checkpoint.tensors)
    state = []
    for param in model.parameters():
        state.append(param.data)
        if has_momentum:
            buffer = optimizer.state[param].get("momentum_buffer")
            if buffer is None:
                buffer = optimizer.state[param]["momentum_buffer"] = torch.zeros_like(param)
            state.append(buffer)
    for bn in batchnorm_modules(model).values():
        state += [t for t in (bn.running_mean, bn.running_var, bn.num_batches_tracked) if t is not None]
    with torch.no_grad():
        distributed.broadcast_tensors(state, world)
    for layer in masked_modules(model).values():
        layer._mask_cache = None


def _wrap(model: nn.Module, config: SearchConfig, world: World, device: torch.device) -> nn.Module:
    train_model = model
    if world.is_distributed:
        # The weights are non-persistent buffers regenerated identically on every rank: keep DDP from
        # broadcasting them (68 M floats for a WRN-50). BN statistics are averaged after each step instead
        # of broadcast from rank 0 each forward, so they see every rank's batches.
        model._ddp_params_and_buffers_to_ignore = [f"{name}.weight" for name in masked_modules(model)]
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, **_no_forward_buffer_sync()
        )
    if config.compile:
        train_model = torch.compile(train_model)
    return train_model


def _no_forward_buffer_sync() -> dict:
    # Newer torch renamed the flag (broadcast_buffers is deprecated); either way buffers sync once at init.
    parameters = inspect.signature(nn.parallel.DistributedDataParallel.__init__).parameters
    return {"forward_sync_buffers": False} if "forward_sync_buffers" in parameters else {"broadcast_buffers": False}


def _workers(config: SearchConfig, world: World) -> int:
    if config.workers is not None:
        return config.workers
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 2
    return max(1, min(8, cores // world.local_world_size))

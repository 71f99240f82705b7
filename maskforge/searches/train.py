"""The training steps: one epoch of SGD on the scores, the held-out evaluation, the learning-rate schedule.

`start_epoch(session)` opens the epoch's running sums; `train_one_epoch(session, totals)` runs the rest
of the epoch one optimizer step at a time (a generator: the caller checkpoints and reports between
steps); `end_epoch(session, totals)` evaluates on the held-out split and returns the epoch's metrics
record. Nothing here writes files or draws on a
terminal; progress leaves through `StepProgress`, whose numbers are read from the device only when
someone asks for them (no host sync per step).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import distributed
from ..data import augment_batch, derive_seed, iterate_batches
from ..distributed import World
from .device import Accelerator, on_device
from .setup import Session


def lr_at(step: int, total_steps: int, warmup_steps: int, base_lr: float) -> float:
    """Linear warm-up to base_lr, then cosine decay to 0 at total_steps (per optimizer step)."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * base_lr * (1.0 + math.cos(math.pi * min(1.0, progress)))


@dataclass
class StepProgress:
    """The state after an optimizer step, for progress displays (`on_step`).

    `train_loss`, `train_acc` and `images_per_s` cover the current epoch so far on this process (all
    processes for images_per_s); reading them waits for the device, so a display should read them only
    as often as it redraws. `eta_s` is the search's one estimate of the seconds left (None until two
    steps are timed: maskforge.searches.notices.CostWatch).
    """

    step: int
    total_steps: int
    epoch: int  # 1-based
    epochs: int
    lr: float
    _sums: tuple  # (loss sum tensor, correct tensor, seen)
    _started: float
    _seen_here: int
    _world_size: int
    eta_s: float | None = None

    @property
    def train_loss(self) -> float:
        return float(self._sums[0]) / max(1, self._sums[2])

    @property
    def train_acc(self) -> float:
        return int(self._sums[1]) / max(1, self._sums[2])

    @property
    def images_per_s(self) -> float:
        return self._seen_here * self._world_size / max(time.perf_counter() - self._started, 1e-9)


@dataclass
class EpochTotals:
    """One rank's share of an epoch: sums on the device, counts and time on the host."""

    loss_sum: torch.Tensor
    correct: torch.Tensor
    seen: int
    seen_here: int  # examples of this epoch trained by this call (not before a resume)
    started: float

    def as_row(self) -> list:
        return [float(self.loss_sum), int(self.correct), self.seen]


def start_epoch(session: Session) -> EpochTotals:
    """The running sums of the epoch at `session.position` (a resumed epoch continues its recorded sums)."""
    loss_sum, correct, seen = session.epoch_sums
    session.epoch_sums = [0.0, 0, 0]
    device = session.accelerator.device
    return EpochTotals(
        torch.tensor(float(loss_sum), dtype=torch.float64, device=device),
        torch.tensor(int(correct), dtype=torch.int64, device=device),
        int(seen),
        0,
        time.perf_counter(),
    )


def train_one_epoch(session: Session, totals: EpochTotals) -> Iterator[StepProgress]:
    """Train from `session.position` to the end of its epoch (or of the search); yield after every step."""
    config, world, accelerator = session.config, session.world, session.accelerator
    epoch, first = session.position.epoch, session.position.batch_in_epoch
    session.model.train()
    batches = on_device(
        iterate_batches(
            session.splits.train,
            config.batch_size,
            shuffle=True,
            seed=config.seed,
            epoch=epoch,
            start_batch=first,
            rank=world.rank,
            world_size=world.world_size,
            workers=session.workers,
            pin_memory=accelerator.device.type == "cuda",
        ),
        accelerator.device,
    )
    try:
        for batch_index, (images, labels) in enumerate(batches, start=first):
            if session.position.step >= session.total_steps:
                break
            lr = lr_at(session.position.step, session.total_steps, session.warmup_steps, config.lr)
            _step(session, totals, epoch, batch_index, images, labels, lr)
            yield StepProgress(
                session.position.step,
                session.total_steps,
                epoch + 1,
                config.epochs,
                lr,
                (totals.loss_sum, totals.correct, totals.seen),
                totals.started,
                totals.seen_here,
                world.world_size,
            )
    finally:
        batches.close()


def _step(
    session: Session,
    totals: EpochTotals,
    epoch: int,
    batch_index: int,
    images: torch.Tensor,
    labels: torch.Tensor,
    lr: float,
) -> None:
    config, world, accelerator = session.config, session.world, session.accelerator
    if session.splits.augment:
        # A generator on the batch's device: on CUDA the random draws need no host round trip.
        generator = torch.Generator(device=images.device)
        generator.manual_seed(derive_seed("maskforge/augment/v1", config.seed, epoch, batch_index, world.rank))
        images = augment_batch(images, generator)
    n = labels.numel()  # this rank's share of the global batch (0 is possible in a short last one)
    global_count = min(config.batch_size, len(session.splits.train) - batch_index * config.batch_size)
    for group in session.optimizer.param_groups:
        group["lr"] = lr
    with accelerator.autocast():
        logits = session.train_model(accelerator.inputs(images, session.splits.spec))
        local_sum = F.cross_entropy(logits.float(), labels, label_smoothing=config.label_smoothing, reduction="sum")
        # DDP averages the N gradients; scaled by N / global_count, that average is the gradient of the
        # global batch's mean loss, however unevenly a short batch was shared.
        loss = local_sum * (world.world_size / global_count)
    session.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    session.optimizer.step()
    if world.is_distributed:
        with torch.no_grad():  # each rank's statistics count by its share of the batch
            distributed.weighted_sum_(session.bn_stats, n / global_count, world)
    session.position.step += 1
    session.position.batch_in_epoch = batch_index + 1
    # Accumulated on the device: no host sync per step.
    totals.loss_sum += local_sum.detach().double()
    totals.correct += (logits.argmax(1) == labels).sum()
    totals.seen += n
    totals.seen_here += n


def end_epoch(session: Session, totals: EpochTotals) -> dict:
    """Close the current epoch: sum the train metrics over ranks, evaluate on the held-out split, record
    the metrics and move the position to the next epoch's start. Collective under torchrun."""
    position = session.position
    train_time = time.perf_counter() - totals.started
    loss_total, correct_total, seen_total, here_total = distributed.sum_over_ranks(
        [float(totals.loss_sum), int(totals.correct), totals.seen, totals.seen_here], session.world
    )
    heldout_loss, heldout_acc = evaluate_accuracy(
        session.model,
        session.splits.heldout,
        session.splits.spec,
        session.accelerator,
        workers=session.workers,
        world=session.world,
    )
    step = position.step
    record = {
        "epoch": position.epoch + 1,
        "step": step,
        "lr": lr_at(step - 1, session.total_steps, session.warmup_steps, session.config.lr)
        if step
        else session.config.lr,
        "train_loss": loss_total / max(1, seen_total),
        "train_acc": correct_total / max(1, seen_total),
        "heldout_loss": heldout_loss,
        "heldout_acc": heldout_acc,
        "images_per_s": here_total / max(train_time, 1e-9),
        "epoch_seconds": train_time,
    }
    session.metrics.append(record)
    position.epoch, position.batch_in_epoch = position.epoch + 1, 0
    return record


def evaluate_accuracy(
    model: nn.Module,
    dataset,
    spec,
    accelerator: Accelerator,
    batch_size: int = 256,
    workers: int = 0,
    *,
    world: World | None = None,
) -> tuple[float, float]:
    """(loss, accuracy) of `model` on every example of `dataset` once.

    Under torchrun (`world`) each rank evaluates its share of every batch and the sums are added.
    """
    world = world or World()
    model.eval()
    device = accelerator.device
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, correct, examples
    batches = iterate_batches(
        dataset,
        batch_size * world.world_size,
        shuffle=False,
        rank=world.rank,
        world_size=world.world_size,
        workers=workers,
        pin_memory=device.type == "cuda",
    )
    with torch.no_grad(), accelerator.autocast():
        for images, labels in on_device(batches, device):
            logits = model(accelerator.inputs(images, spec)).float()
            sums[0] += F.cross_entropy(logits, labels, reduction="sum").double()
            sums[1] += (logits.argmax(1) == labels).sum()
            sums[2] += labels.numel()
    loss_sum, correct, total = distributed.sum_over_ranks(sums.tolist(), world)
    return loss_sum / max(1, total), correct / max(1, total)

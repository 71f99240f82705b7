"""What a search tells its user, through the `logging` logger `maskforge.searches` (rank 0 only).

The library draws nothing and prints nothing: INFO records say what is being done (the start line, the
image size an image folder is decoded at and why, the estimated time after the first steps), WARNING
records what may be a mistake (a split whose classes the other lacks, layers where k keeps almost
nothing, a large network on the CPU). The CLI renders them as lines on stderr (`warning: ...` for
warnings); a notebook sees the warnings through Python's default handler, and INFO once it configures
logging. Messages name config fields (`max_steps`), not command-line flags.
"""

from __future__ import annotations

import logging
import math
import time

import torch
import torch.nn as nn

from ..data import DataSplits, split_warnings
from ..layers import masked_modules
from ..schema import SearchConfig
from .setup import Session

log = logging.getLogger("maskforge.searches")

#: Fewer kept weights than this in a layer is "almost nothing".
HANDFUL = 5
#: Networks with more masked weights than this are slow on a CPU (resnet18 has 11 M; conv4 on CIFAR 2.4 M).
LARGE_ON_CPU = 5_000_000
#: An estimate above this on the CPU earns the warning too.
LONG_ON_CPU_SECONDS = 3600.0
#: The estimate follows this many steps after the first (which includes one-off costs), or this many seconds.
ESTIMATE_STEPS = 5
ESTIMATE_SECONDS = 30.0
#: What to do about a slow CPU search.
CPU_ADVICE = ("use a GPU (device cuda), bound the search with max_steps, or search a smaller arch "
              "(see `maskforge archs`)")


def data_notices(splits: DataSplits) -> None:
    for note in splits.notes:
        log.info("%s", note)
    for warning in split_warnings(splits):
        log.warning("%s", warning)


def model_notices(model: nn.Module, config: SearchConfig, device: str) -> bool:
    """Warn about layers where k keeps almost nothing, and about a large network on the CPU; returns
    whether the CPU warning was given."""
    layers = masked_modules(model)
    tiny = [(name, layer.kept, layer.weight.numel()) for name, layer in layers.items() if layer.kept < HANDFUL]
    if tiny:
        shown = ", ".join(f"{name} keeps {kept} of {total}" for name, kept, total in tiny[:4])
        log.warning("k %g keeps fewer than %d weights in %d layer(s) (%s%s): such a layer can pass almost "
                    "nothing on; a larger k keeps more", config.k, HANDFUL, len(tiny), shown,
                    ", ..." if len(tiny) > 4 else "")
    weights = sum(layer.weight.numel() for layer in layers.values())
    if device == "cpu" and weights > LARGE_ON_CPU:
        log.warning("%s has %.1f M weights and runs on the CPU, where a search of it is slow (hours per epoch on "
                    "large data): %s", config.arch, weights / 1e6, CPU_ADVICE)
        return True
    return False


def announce(session: Session, story: str) -> None:
    """The start line: what is searched, on what, where it is written, on which device, how long."""
    config, splits, world = session.config, session.splits, session.world
    spec = splits.spec
    position = session.position
    steps = (f"{session.total_steps:,} steps ({config.epochs} epoch(s) of {session.steps_per_epoch:,}, "
             f"batch {config.batch_size}" + (f", max_steps {config.max_steps}" if config.max_steps else "") + ")")
    if position.step:
        steps += f", from step {position.step:,}"
    log.info("%ssearch %s k=%g seed %d on %s (%s train / %s held-out images, %dx%dx%d, %d classes) -> %s; "
             "device %s, %d process(es); %s", f"{story}: " if story else "", config.arch, config.k, config.seed,
             splits.name, f"{len(splits.train):,}", f"{len(splits.heldout):,}", spec.channels, spec.height,
             spec.width, spec.num_classes, config.out, session.accelerator.device.type, world.world_size, steps)


class CostWatch:
    """After the first few steps, log the estimated time of the rest of the search (and warn, once, about a
    long search on the CPU unless `model_notices` did)."""

    def __init__(self, session: Session, warned: bool) -> None:
        self.session = session
        self.warned = warned
        self.first_step = session.position.step + 1
        self.started: float | None = None
        self.done = session.total_steps - session.position.step <= ESTIMATE_STEPS + 1  # too short to bother

    def after_step(self) -> None:
        if self.done:
            return
        step = self.session.position.step
        if step == self.first_step:
            self.started = self._now()
            return
        if step - self.first_step < ESTIMATE_STEPS and time.perf_counter() - self.started < ESTIMATE_SECONDS:
            return
        self.done = True
        per_step = (self._now() - self.started) / (step - self.first_step)
        seconds = self.estimate(per_step)
        log.info("estimated time: about %s for the remaining %s steps (%.3g s per step on %s, held-out "
                 "evaluations included)", format_duration(seconds), f"{self.session.total_steps - step:,}",
                 per_step, self.session.accelerator.device.type)
        if self.session.accelerator.device.type == "cpu" and seconds > LONG_ON_CPU_SECONDS and not self.warned:
            log.warning("this search would take about %s on the CPU: %s", format_duration(seconds), CPU_ADVICE)

    def estimate(self, per_step: float) -> float:
        """Seconds for the remaining steps, plus the held-out evaluations still due (a forward pass, about a
        third of a training step per image)."""
        session = self.session
        remaining = session.total_steps - session.position.step
        evaluations = math.ceil(session.total_steps / session.steps_per_epoch) - session.position.epoch
        per_image = per_step / session.config.batch_size
        return remaining * per_step + evaluations * len(session.splits.heldout) * per_image / 3

    def _now(self) -> float:
        if self.session.accelerator.device.type == "cuda":
            torch.cuda.synchronize(self.session.accelerator.device)  # twice per search: the steps are async
        return time.perf_counter()


def format_duration(seconds: float) -> str:
    """`45 s`, `3 min 20 s`, `2 h 05 min`, `3 d 04 h`."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours} h {minutes:02d} min"
    days, hours = divmod(hours, 24)
    return f"{days} d {hours:02d} h"

"""What a search tells its user, through the `logging` logger `maskforge.searches` (rank 0 only).

The library draws nothing and prints nothing: INFO records say what is being done (the start line, the
image size an image folder is decoded at and why, the estimated time after the first steps), WARNING
records what may be a mistake (a split whose classes the other lacks, layers where k keeps almost
nothing, a large network on the CPU). The CLI renders them as lines on stderr (`warning: ...` for
warnings); a notebook sees the warnings through Python's default handler, and INFO once it configures
logging. Messages name the command-line flags the user typed (`--max-steps`, the config field `max_steps`),
as the config's field descriptions do.
"""

from __future__ import annotations

import logging
import math
import signal
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
#: The estimate is given once this many steps after the first (which pays one-off costs) are timed.
ESTIMATE_STEPS = 2


def cpu_advice(config: SearchConfig) -> str:
    """What to do about a slow CPU search (a search already bounded is told to bound it more)."""
    bound = "a smaller --max-steps" if config.max_steps else "bound the search with --max-steps"
    return f"use a GPU (--device cuda), {bound}, or search a smaller --arch (see `maskforge archs`)"


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
        log.warning(
            "k %g keeps fewer than %d weights in %d layer(s) (%s%s): such a layer can pass almost "
            "nothing on; a larger k keeps more",
            config.k,
            HANDFUL,
            len(tiny),
            shown,
            ", ..." if len(tiny) > 4 else "",
        )
    weights = sum(layer.weight.numel() for layer in layers.values())
    if device == "cpu" and weights > LARGE_ON_CPU:
        log.warning(
            "%s has %.1f M weights and runs on the CPU, where a search of it is slow (hours per epoch on "
            "large data): %s",
            config.arch,
            weights / 1e6,
            cpu_advice(config),
        )
        return True
    return False


def announce(session: Session, story: str) -> None:
    """The start line: what is searched, on what, where it is written, on which device, how long."""
    config, splits, world = session.config, session.splits, session.world
    spec = splits.spec
    position = session.position
    steps = (
        f"{session.total_steps:,} steps ({config.epochs} epoch(s) of {session.steps_per_epoch:,}, "
        f"batch {config.batch_size}" + (f", max_steps {config.max_steps}" if config.max_steps else "") + ")"
    )
    if position.step:
        steps += f", from step {position.step:,}"
    log.info(
        "%ssearch %s k=%g seed %d on %s (%s train / %s held-out images, %dx%dx%d, %d classes) -> %s; "
        "device %s, %d process(es); %s",
        f"{story}: " if story else "",
        config.arch,
        config.k,
        config.seed,
        splits.name,
        f"{len(splits.train):,}",
        f"{len(splits.heldout):,}",
        spec.channels,
        spec.height,
        spec.width,
        spec.num_classes,
        config.out,
        session.accelerator.device.type,
        world.world_size,
        steps,
    )


class CostWatch:
    """The one estimate of the time a search has left: logged once as soon as two steps are timed, and
    given to every progress display with each step (`StepProgress.eta_s`), so the start, the bar and the
    log lines all tell the same figure. (It also warns, once, about a long search on the CPU unless
    `model_notices` did.)

    The first step of a run is not timed (it pays the one-off costs: allocation, autotuning, compilation).
    After it, the estimate is the mean time of the steps timed so far times the steps left, plus the
    held-out evaluations still due: each costs what the last one did once one has run (with its
    checkpoint), and before that about a third of a training step per image (a forward pass). On CUDA
    the clock waits for the device at the first step and when the estimate is first logged; later steps
    are timed without a sync (the host runs at most a bounded queue ahead of the device).
    """

    def __init__(self, session: Session, warned: bool, announce: bool = True) -> None:
        self.session = session
        self.warned = warned
        self.first_step = session.position.step + 1
        self.announced = not announce or session.total_steps - session.position.step <= ESTIMATE_STEPS + 1
        self.per_step: float | None = None  # mean seconds of a timed step
        self.evaluation: float | None = None  # seconds of the last held-out evaluation (and checkpoint)
        self._last: float | None = None  # when the last step ended
        self._epoch = session.position.epoch
        self._timed_steps = 0
        self._timed_seconds = 0.0

    def after_step(self) -> float | None:
        """Record the step just taken; the seconds the search has left (None until two steps are timed)."""
        session = self.session
        step, epoch = session.position.step, session.position.epoch
        synced = step == self.first_step or (self._timed_steps + 1 == ESTIMATE_STEPS and not self.announced)
        now = self._now(synced)
        if self._last is not None:
            elapsed = now - self._last
            if epoch != self._epoch:  # an evaluation (and a checkpoint) ran since the last step
                if self.per_step is not None:
                    self.evaluation = max(0.0, elapsed - self.per_step)
            else:
                self._timed_steps += 1
                self._timed_seconds += elapsed
                self.per_step = self._timed_seconds / self._timed_steps
        self._last, self._epoch = now, epoch
        if self._timed_steps < ESTIMATE_STEPS or self.per_step is None:
            return None
        seconds = self.estimate(self.per_step)
        if not self.announced:
            self.announced = True
            log.info(
                "estimated time: about %s for the remaining %s steps (%.3g s per step on %s, held-out "
                "evaluations included)",
                format_duration(seconds),
                f"{session.total_steps - step:,}",
                self.per_step,
                session.accelerator.device.type,
            )
            if session.accelerator.device.type == "cpu" and seconds > LONG_ON_CPU_SECONDS and not self.warned:
                log.warning(
                    "this search would take about %s on the CPU: %s",
                    format_duration(seconds),
                    cpu_advice(session.config),
                )
        return seconds

    def step_left(self) -> float | None:
        """Seconds until the step now running ends (None before a step was timed): what a Ctrl-C waits."""
        if self.per_step is None or self._last is None:
            return None
        return max(0.0, self.per_step - (time.perf_counter() - self._last))

    def estimate(self, per_step: float) -> float:
        """Seconds for the remaining steps and the held-out evaluations still due."""
        session = self.session
        remaining = session.total_steps - session.position.step
        evaluations = math.ceil(session.total_steps / session.steps_per_epoch) - session.position.epoch
        each = (
            self.evaluation
            if self.evaluation is not None
            else len(session.splits.heldout) * per_step / session.config.batch_size / 3
        )
        return remaining * per_step + evaluations * each

    def _now(self, synced: bool) -> float:
        if synced and self.session.accelerator.device.type == "cuda":
            torch.cuda.synchronize(self.session.accelerator.device)  # rarely: the steps are asynchronous
        return time.perf_counter()


def stopping(signum: int, step_left: float | None) -> None:
    """Answer a first Ctrl-C or SIGTERM at once, while the step it waits for is still running."""
    about = f" (about {format_duration(math.ceil(step_left))})" if step_left is not None else ""
    if signum == signal.SIGINT:
        log.info("stopping after this step%s; press Ctrl-C again to stop now", about)
    else:
        log.info("%s: stopping after this step%s to save a checkpoint", signal.Signals(signum).name, about)


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

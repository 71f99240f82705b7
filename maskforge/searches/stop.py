"""Stopping a search on SIGINT (Ctrl-C) or SIGTERM (what Slurm, Kubernetes and most schedulers send before
they kill a job): at the next optimizer step it writes its checkpoint and raises `SearchInterrupted`,
whose `exit_code` (130 for SIGINT, 143 for SIGTERM: 128 + the signal) the CLI exits with.

`StopSignals` installs the handlers for the duration of a search (main thread only; a signal that the
caller ignores, as `nohup` does for SIGINT, stays ignored) and restores the previous ones afterwards:

* during start-up (before the first step: planning, loading data) a signal raises `SearchInterrupted` at
  once: there is nothing to save yet;
* while training, the first signal sets a flag and is answered at once (`on_first`: the search logs
  "stopping after this step (about N s); press Ctrl-C again to stop now"); a second Ctrl-C raises
  KeyboardInterrupt at once (the last checkpoint written stays as it was: every write is atomic);
* while finishing (the artifact is being written) the search completes.

Under torchrun the signal may reach one rank or all of them, at different steps. `StopAgreement.poll`
is called by every rank after every step: each rank contributes its flag to an all-reduce (MAX) on a
gloo group of its own, issued asynchronously at one poll and read at the next, so it runs while a step
computes (its cost is not measured yet).
Every rank issues the same sequence of these all-reduces and reads the same maxima, so all ranks decide
to stop at the same step, and the collective checkpoint that follows cannot deadlock.
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from ..distributed import World

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class SearchInterrupted(KeyboardInterrupt):
    """A search stopped by a signal. `checkpoint_step` is the step its checkpoint holds (None: the search
    stopped before its first step and wrote nothing); `run_dir` the run folder (None: not chosen yet)."""

    def __init__(
        self,
        signum: int,
        run_dir: str | Path | None = None,
        checkpoint_step: int | None = None,
        total_steps: int | None = None,
        resumable: bool = False,
    ) -> None:
        self.signal_name = signal.Signals(signum).name
        self.exit_code = 128 + int(signum)
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.checkpoint_step, self.total_steps = checkpoint_step, total_steps
        self.resumable = resumable or checkpoint_step is not None
        super().__init__(self.describe())

    def describe(self) -> str:
        if self.checkpoint_step is not None:
            return (
                f"interrupted by {self.signal_name} at step {self.checkpoint_step} of {self.total_steps}: "
                f"checkpoint saved in {self.run_dir}"
            )
        where = f" ({self.run_dir} is unchanged)" if self.run_dir is not None else ""
        return f"interrupted by {self.signal_name} during start-up, before the first step{where}"


class StopSignals:
    """`with StopSignals() as signals:` ... `signals.training()` ... `signals.received` (0 or a signal)."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.received = 0
        self.stage = "startup"  # "startup" | "training" | "finishing"
        self.run_dir: Path | None = None
        self.resumable = False  # start-up of a resume: the folder's checkpoint is still there
        self.on_first: Callable[[int], None] | None = None  # told of the first signal while training
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "StopSignals":
        if self.enabled and threading.current_thread() is threading.main_thread():
            for signum in SIGNALS:
                previous = signal.getsignal(signum)
                if previous is not signal.SIG_IGN:
                    self._previous[signum] = previous
                    signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()

    def training(self) -> None:
        self.stage = "training"

    def finishing(self) -> None:
        self.stage = "finishing"

    def _handle(self, signum: int, frame) -> None:
        if self.stage == "startup":
            raise SearchInterrupted(signum, self.run_dir, resumable=self.resumable)
        if self.received and signum == signal.SIGINT and self.stage == "training":
            raise KeyboardInterrupt  # a second Ctrl-C: stop now, without a checkpoint
        if not self.received and self.stage == "training" and self.on_first is not None:
            try:
                self.on_first(signum)
            except Exception:  # noqa: BLE001 - e.g. stderr was mid-write when the signal came: the stop
                pass  # itself must not fail for a notice
        self.received = self.received or signum


class StopAgreement:
    """The signal every rank stops for, agreed step by step (see the module docstring)."""

    def __init__(self, signals: StopSignals, world: World) -> None:
        self.signals = signals
        self._group = dist.new_group(backend="gloo") if world.is_distributed else None
        self._pending = None

    def poll(self) -> int:
        """0 to go on, or the signal number on which every rank stops now."""
        if self._group is None:
            return self.signals.received
        agreed = 0
        if self._pending is not None:
            work, flag = self._pending
            work.wait()
            agreed, self._pending = int(flag.item()), None
        if not agreed:
            flag = torch.tensor([self.signals.received], dtype=torch.int64)
            self._pending = (dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group, async_op=True), flag)
        return agreed

    def close(self) -> None:
        """Finish the all-reduce in flight (every rank has issued the same ones) and free the group."""
        if self._group is None:
            return
        if self._pending is not None:
            self._pending[0].wait()
            self._pending = None
        dist.destroy_process_group(self._group)
        self._group = None

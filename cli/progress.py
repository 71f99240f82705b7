"""The search's progress, fed by the library's `on_step` / `on_epoch` callbacks: a rich bar in a terminal,
plain lines anywhere else (a log file, nohup, Slurm, CI).

The library only reports; drawing (and how often) is decided here. Reading the running loss waits for
the device, so the bar redraws at most every `REDRAW_SECONDS` and the plain output writes a line per
epoch plus, in long epochs, a line every `HEARTBEAT_SECONDS`. Both show an ETA from the steps done in
this run. While the bar is on screen, the library's log lines print above it (cli/logs.py).
"""

from __future__ import annotations

import time

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from maskforge.searches.notices import format_duration as duration

from . import logs

REDRAW_SECONDS = 0.2
HEARTBEAT_SECONDS = 60.0


class _Clock:
    """Steps and time since this run's first step: the ETA of the remaining steps."""

    def __init__(self) -> None:
        self.total_steps = 0
        self.epochs = 0
        self._first: tuple[int, float] | None = None

    def step(self, progress) -> None:
        self.total_steps, self.epochs = progress.total_steps, progress.epochs
        if self._first is None:
            self._first = (progress.step - 1, time.monotonic())

    def eta(self, step: int) -> str:
        if self._first is None or step <= self._first[0]:
            return "?"
        per_step = (time.monotonic() - self._first[1]) / (step - self._first[0])
        return duration(per_step * max(0, self.total_steps - step))


def epoch_line(record: dict, clock: _Clock) -> str:
    return (f"epoch {record['epoch']}/{clock.epochs or '?'}: train loss {record['train_loss']:.4f}, acc "
            f"{record['train_acc']:.1%}; held-out loss {record['heldout_loss']:.4f}, acc {record['heldout_acc']:.2%}; "
            f"{record['images_per_s']:,.0f} img/s; step {record['step']:,}/{clock.total_steps:,}, "
            f"ETA {clock.eta(record['step'])}")


class SearchProgress:
    """`with SearchProgress() as bar: search(config, on_step=bar.on_step, on_epoch=bar.on_epoch)`."""

    def __init__(self) -> None:
        self._progress = Progress(
            TextColumn("[bold]search[/] epoch {task.fields[epoch]}/{task.fields[epochs]}"), BarColumn(),
            MofNCompleteColumn(), TextColumn("loss {task.fields[loss]:.3f}  acc {task.fields[acc]:.1%}  "
                                             "{task.fields[images_per_s]:.0f} img/s"),
            TimeRemainingColumn())
        self._task = None
        self._drawn = 0.0
        self._clock = _Clock()
        self._handler = logs.current()

    def __enter__(self) -> "SearchProgress":
        self._progress.__enter__()
        if self._handler is not None:
            self._handler.sink = lambda line: self._progress.console.print(line, markup=False, highlight=False)
        return self

    def __exit__(self, *exc) -> None:
        if self._handler is not None:
            self._handler.sink = None
        self._progress.__exit__(*exc)

    def on_step(self, step) -> None:
        self._clock.step(step)
        if self._task is None:
            self._task = self._progress.add_task("search", total=step.total_steps, completed=step.step - 1,
                                                 epoch=0, epochs=0, loss=0.0, acc=0.0, images_per_s=0.0)
        now = time.monotonic()
        if now - self._drawn < REDRAW_SECONDS and step.step < step.total_steps:
            return
        self._drawn = now
        self._progress.update(self._task, completed=step.step, epoch=step.epoch, epochs=step.epochs,
                              loss=step.train_loss, acc=step.train_acc, images_per_s=step.images_per_s)

    def on_epoch(self, record: dict) -> None:
        self._progress.console.print(epoch_line(record, self._clock), markup=False, highlight=False)


class LineProgress:
    """Plain lines on stderr: one per epoch, and one every `HEARTBEAT_SECONDS` inside a long epoch."""

    def __init__(self, heartbeat: float = HEARTBEAT_SECONDS) -> None:
        self._clock = _Clock()
        self._heartbeat = heartbeat
        self._last = time.monotonic()

    def on_step(self, step) -> None:
        self._clock.step(step)
        now = time.monotonic()
        if now - self._last < self._heartbeat:
            return
        self._last = now
        typer.echo(f"step {step.step:,}/{step.total_steps:,} (epoch {step.epoch}/{step.epochs}): loss "
                   f"{step.train_loss:.4f}, acc {step.train_acc:.1%}, {step.images_per_s:,.0f} img/s, ETA "
                   f"{self._clock.eta(step.step)}", err=True)

    def on_epoch(self, record: dict) -> None:
        self._last = time.monotonic()
        typer.echo(epoch_line(record, self._clock), err=True)

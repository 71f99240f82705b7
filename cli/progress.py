"""The search's progress, fed by the library's `on_step` / `on_epoch` callbacks: a rich bar in a terminal,
plain lines anywhere else (a log file, nohup, Slurm, CI).

The library only reports; drawing (and how often) is decided here. Reading the running loss waits for
the device, so the bar redraws at most every `REDRAW_SECONDS` and the plain output writes a line per
epoch plus, in long epochs, a line every `HEARTBEAT_SECONDS`. Both show the search's own estimate of
the time left (`StepProgress.eta_s`, the figure the "estimated time" line gave), never one of their own.
While the bar is on screen, the library's log lines print above it (cli/logs.py).
"""

from __future__ import annotations

import time

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn
from rich.text import Text

from maskforge.searches.notices import format_duration as duration

from . import logs

REDRAW_SECONDS = 0.2
HEARTBEAT_SECONDS = 60.0


class _Clock:
    """The totals and the search's latest estimate of the time left, as of the last step."""

    def __init__(self) -> None:
        self.total_steps = 0
        self.epochs = 0
        self._eta: tuple[float, float] | None = None  # (seconds left, when it was given)

    def step(self, progress) -> None:
        self.total_steps, self.epochs = progress.total_steps, progress.epochs
        eta = getattr(progress, "eta_s", None)
        if eta is not None:
            self._eta = (eta, time.monotonic())

    def eta(self) -> str:
        """`3 min 20 s`, counting down from the last estimate; `?` until two steps are timed."""
        if self._eta is None:
            return "?"
        seconds, given = self._eta
        return duration(max(0.0, seconds - (time.monotonic() - given)))


def epoch_line(record: dict, clock: _Clock) -> str:
    return (
        f"epoch {record['epoch']}/{clock.epochs or '?'}: train loss {record['train_loss']:.4f}, acc "
        f"{record['train_acc']:.1%}; held-out loss {record['heldout_loss']:.4f}, acc {record['heldout_acc']:.2%}; "
        f"{record['images_per_s']:,.0f} img/s; step {record['step']:,}/{clock.total_steps:,}"
        + ("" if record["step"] >= clock.total_steps else f", ETA {clock.eta()}")
    )


class _EtaColumn(ProgressColumn):
    """The bar's `ETA ...`: the search's estimate, counting down between steps."""

    def __init__(self, clock: _Clock) -> None:
        super().__init__()
        self._clock = clock

    def render(self, task) -> Text:
        return Text(f"ETA {self._clock.eta()}")


class SearchProgress:
    """`with SearchProgress() as bar: search(config, on_step=bar.on_step, on_epoch=bar.on_epoch)`."""

    def __init__(self) -> None:
        self._clock = _Clock()
        self._progress = Progress(
            TextColumn("[bold]search[/] epoch {task.fields[epoch]}/{task.fields[epochs]}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn(
                "loss {task.fields[loss]:.3f}  acc {task.fields[acc]:.1%}  {task.fields[images_per_s]:.0f} img/s"
            ),
            _EtaColumn(self._clock),
        )
        self._task = None
        self._drawn = 0.0
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
            self._task = self._progress.add_task(
                "search",
                total=step.total_steps,
                completed=step.step - 1,
                epoch=0,
                epochs=0,
                loss=0.0,
                acc=0.0,
                images_per_s=0.0,
            )
        now = time.monotonic()
        if now - self._drawn < REDRAW_SECONDS and step.step < step.total_steps:
            return
        self._drawn = now
        self._progress.update(
            self._task,
            completed=step.step,
            epoch=step.epoch,
            epochs=step.epochs,
            loss=step.train_loss,
            acc=step.train_acc,
            images_per_s=step.images_per_s,
        )

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
        typer.echo(
            f"step {step.step:,}/{step.total_steps:,} (epoch {step.epoch}/{step.epochs}): loss "
            f"{step.train_loss:.4f}, acc {step.train_acc:.1%}, {step.images_per_s:,.0f} img/s, ETA "
            f"{self._clock.eta()}",
            err=True,
        )

    def on_epoch(self, record: dict) -> None:
        self._last = time.monotonic()
        typer.echo(epoch_line(record, self._clock), err=True)

"""The search's progress bar: a rich display fed by the library's `on_step` / `on_epoch` callbacks.

The library only reports; drawing (and how often) is decided here. Reading the running loss waits for
the device, so the bar redraws at most every `REDRAW_SECONDS` rather than after every step.
"""

from __future__ import annotations

import time

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

REDRAW_SECONDS = 0.2


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

    def __enter__(self) -> "SearchProgress":
        self._progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._progress.__exit__(*exc)

    def on_step(self, step) -> None:
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
        self._progress.console.print(
            f"epoch {record['epoch']}  loss {record['train_loss']:.4f}  held-out acc {record['heldout_acc']:.2%}  "
            f"{record['images_per_s']:.0f} img/s")

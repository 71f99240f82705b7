"""How the command line shows what the library logs: one line per record on stderr.

The library reports notices (INFO: what a search is doing, the estimated time) and warnings (WARNING:
what may be a mistake) through the `maskforge` logger and prints nothing itself. Here they become lines
on stderr, warnings as `warning: ...`. While the search's progress bar is on screen the lines go through
its console, above the bar (`sink`). Under torchrun only rank 0 shows them; `--quiet` keeps warnings only.
"""

from __future__ import annotations

import logging
import os
from typing import Callable

import typer

from maskforge.textguard import MESSAGE_LIMIT, printable

LOGGER = "maskforge"


class LineHandler(logging.Handler):
    """Renders maskforge's log records as lines; `sink` (default: stderr) receives each line."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.sink: Callable[[str], None] | None = None

    def emit(self, record: logging.LogRecord) -> None:
        try:
            # one line, whatever the message holds (it may quote a file: escapes shown as text, bounded)
            text = printable(" ".join(record.getMessage().split()), limit=MESSAGE_LIMIT)
        except Exception:  # noqa: BLE001 - a malformed record must not break the command
            self.handleError(record)
            return
        line = f"warning: {text}" if record.levelno >= logging.WARNING else text
        if self.sink is not None:
            self.sink(line)
        else:
            typer.echo(line, err=True)


def install() -> LineHandler:
    """Attach a line handler to the `maskforge` logger (INFO, or ERROR on a torchrun rank other than 0)."""
    logger = logging.getLogger(LOGGER)
    handler = LineHandler()
    logger.addHandler(handler)
    logger.setLevel(logging.INFO if os.environ.get("RANK", "0") in ("", "0") else logging.ERROR)
    return handler


def uninstall(handler: LineHandler) -> None:
    logger = logging.getLogger(LOGGER)
    logger.removeHandler(handler)
    logger.setLevel(logging.NOTSET)


def quiet() -> None:
    """Warnings and errors only (`--quiet`)."""
    logger = logging.getLogger(LOGGER)
    logger.setLevel(max(logger.getEffectiveLevel(), logging.WARNING))


def current() -> LineHandler | None:
    return next((h for h in logging.getLogger(LOGGER).handlers if isinstance(h, LineHandler)), None)

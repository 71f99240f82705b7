"""Values from files, ready for rich output: control characters escaped (`maskforge.textguard.printable`)
and never read as rich markup (a class name `[bold red]x[/]` is shown as typed, not styled)."""

from __future__ import annotations

from rich.text import Text

from maskforge.textguard import printable


def cell(value: object, limit: int | None = None) -> Text:
    """`value` as a rich Text for a table cell or title: literal, printable, at most `limit` characters."""
    return Text(printable(value, limit=limit))

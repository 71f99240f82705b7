"""Text that came from a file, made safe to show: printable on a terminal, and of bounded length.

A correctly sealed artifact may still hold hostile strings (class names, provenance, an ONNX file's
metadata): an ESC sequence printed as is clears the screen, recolours the terminal or sets its window
title, and a 99 MB string quoted in an error message makes a 99 MB error line. Every string read from a
file goes through `printable` before it is printed, and through `quote` before a message quotes it.
JSON output (`--json`) keeps the exact values: JSON escapes control characters itself.

>>> printable("cat\\x1b[2J")
'cat\\\\x1b[2J'
>>> quote("x" * 500)[-3:], len(quote("x" * 500))
("x'…", 203)
"""

from __future__ import annotations

import re

#: At most this many characters of a file's content are quoted in one message.
QUOTE_LIMIT = 200
#: An error line is cut after this many characters, whatever it quotes (the CLI's last line of defence).
MESSAGE_LIMIT = 2000
ELLIPSIS = "…"

# C0 controls (tab and newline included: a value is shown on one line), DEL, C1 controls (0x9b is a
# one-byte CSI on some terminals), and the Unicode bidirectional overrides and isolates, which reorder
# what follows them on the line ("Trojan Source").
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def _escape(match: re.Match) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def printable(text: object, limit: int | None = None) -> str:
    """`text` (any value, shown with `str`) with every control character written as an escape (`\\x1b`),
    cut to `limit` characters (then "…") when given."""
    text = str(text)
    if limit is not None and len(text) > limit:
        text = text[:limit] + ELLIPSIS
    return _UNSAFE.sub(_escape, text)


def quote(value: object, limit: int = QUOTE_LIMIT) -> str:
    """`repr(value)` for a message: control characters escaped (repr does that for str), at most `limit`
    characters of it, then "…". Cuts before calling repr, so a huge value costs no huge copy."""
    if isinstance(value, str) and len(value) > limit:
        return printable(repr(value[:limit]) + ELLIPSIS)
    shown = repr(value)
    return printable(shown if len(shown) <= limit else shown[:limit] + ELLIPSIS)

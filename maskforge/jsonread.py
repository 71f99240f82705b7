"""The one JSON reader for everything maskforge reads from a file: headers, metadata, run records.

Stricter than `json.loads`: a duplicate key is refused (a second parser could keep the other value),
NaN/Infinity are refused unless asked for, and absurd nesting (a million `[`) is one `MaskforgeError`
instead of a RecursionError. Messages quote at most `textguard.QUOTE_LIMIT` characters of the file.
"""

from __future__ import annotations

import json
from typing import Any

from .errors import MaskforgeError
from .textguard import quote


def strict_json(text: str | bytes, label: str, what: str, *, allow_nan: bool = False):
    """json.loads that refuses duplicate keys, absurd nesting and (unless allowed) NaN/Infinity; `label: what`
    names the document in messages (`runs/a/config.json: the search config has the key 'k' twice`)."""

    def no_duplicates(pairs: list[tuple[str, object]]) -> dict:
        result = {}
        for name, value in pairs:
            if name in result:
                raise MaskforgeError(f"{label}: {what} has the key {quote(name)} twice")
            result[name] = value
        return result

    def no_constant(name: str):
        raise MaskforgeError(f"{label}: {what} contains {name}, which is not valid JSON")

    try:
        constants: dict[str, Any] = {} if allow_nan else {"parse_constant": no_constant}
        return json.loads(text, object_pairs_hook=no_duplicates, **constants)
    except MaskforgeError:
        raise
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # RecursionError: absurd nesting
        raise MaskforgeError(f"{label}: {what} is not valid JSON ({type(exc).__name__})") from None

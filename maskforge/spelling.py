"""How a value is spelled as text: in tables, legends and titles, in results.csv and in folder names.

One rule for every place a person reads an option's value: booleans as `true`/`false` (as on the command
line), None as `none`, floats short (`0.5`, `1e-05`) or, with `exact`, as Python's shortest round-trip
spelling (results.csv cells and sweep folder names must read back as the same number).
"""

from __future__ import annotations

import math
from typing import Any


def spell(value: Any, *, exact: bool = False) -> str:
    """`value` as text; `exact`: a float spelled so that it parses back to itself (non-finite: "nan")."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "none"
    if isinstance(value, float):
        if exact:
            return repr(value) if math.isfinite(value) else "nan"
        return f"{value:g}"
    return str(value)

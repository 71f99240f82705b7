"""The building blocks of every maskforge schema: JSON value types, the record decorator, one parser.

Every document maskforge reads or writes (search config, input spec, artifact, checkpoint) is a
`record`: a pydantic dataclass that refuses unknown fields and validates itself when built, raising
`MaskforgeError` with a message that names the field (`input.std[0] must be > 0, got -1.0`).

JSON numbers are read as numbers whatever their spelling: an `Integer` field takes `3` or `3.0` (any
integral value up to 2^53, beyond which a float cannot hold every integer), a `Number` field takes `1`
or `1.0`. Nothing else is coerced: `true`, `"3"` or `null` where a number belongs is an error.

>>> @record
... class Point:
...     x: Integer = Field(ge=0)
>>> Point(3.0).x
3
>>> Point(-1)
Traceback (most recent call last):
maskforge.errors.MaskforgeError: point: x must be >= 0, got -1
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from typing import Annotated, Any, Callable, TypeVar

import numpy as np
from pydantic import BeforeValidator, ConfigDict, Field, Strict, TypeAdapter, ValidationError
from pydantic.dataclasses import dataclass as pydantic_dataclass

from ..errors import MaskforgeError
from ..textguard import QUOTE_LIMIT, printable, quote

__all__ = [
    "to_integer",
    "Integer",
    "Number",
    "Measurement",
    "Text",
    "Flag",
    "Hex64",
    "Field",
    "record",
    "parse",
    "dump",
    "json_schema",
    "describe",
    "check_format",
]

T = TypeVar("T")

_EXACT_FLOAT_INTEGERS = 2**53
_HEX64 = re.compile(r"[0-9a-f]{64}")


def _is_json_number(value: Any) -> bool:
    # numpy scalars count (statistics are computed with numpy); bool is an int to Python, not to JSON
    return not isinstance(value, (bool, np.bool_)) and isinstance(value, (int, float, np.integer, np.floating))


def to_integer(value: Any) -> int:
    """A JSON number with an integral value as an int (3 and 3.0 alike); ValueError otherwise."""
    if not _is_json_number(value):
        raise ValueError("must be an integer")
    if isinstance(value, (float, np.floating)):
        value = float(value)
        if not (value.is_integer() and abs(value) <= _EXACT_FLOAT_INTEGERS):
            raise ValueError("must be an integer")
    return int(value)


def _number(value: Any) -> float:
    if not _is_json_number(value):
        raise ValueError("must be a number")
    return float(value)


def _finite(value: Any) -> float:
    value = _number(value)
    if not math.isfinite(value):
        raise ValueError("must be a finite number")
    return value


def _hex64(value: Any) -> str:
    if not isinstance(value, str) or _HEX64.fullmatch(value) is None:
        raise ValueError("must be 64 lowercase hex digits (a SHA-256)")
    return value


Integer = Annotated[int, BeforeValidator(to_integer)]
Number = Annotated[float, BeforeValidator(_finite)]  # finite
Measurement = Annotated[float, BeforeValidator(_number)]  # may be NaN or infinite (a diverged search)
Text = Annotated[str, Strict()]
Flag = Annotated[bool, Strict()]
Hex64 = Annotated[str, BeforeValidator(_hex64), Field(pattern=_HEX64.pattern)]

_CONFIG = ConfigDict(extra="forbid")


def record(cls: type[T] | None = None, *, frozen: bool = False, label: str | None = None):
    """Make `cls` a validating pydantic dataclass whose construction errors are `MaskforgeError`s.

    `label` names the record in messages (default: its class name in words, e.g. "search config").
    """

    def wrap(cls: type[T]) -> type[T]:
        built = pydantic_dataclass(cls, frozen=frozen, config=_CONFIG)
        built.__label__ = label or re.sub(r"(?<!^)(?=[A-Z])", " ", cls.__name__).lower()
        names = [f.name for f in dataclasses.fields(built)]
        init = built.__init__

        @functools.wraps(init)
        def __init__(self, *args, **kwargs):
            # Positional arguments by name, so that messages name the field, not its position.
            if len(args) > len(names):
                raise MaskforgeError(f"{built.__label__}: takes at most {len(names)} values, got {len(args)}")
            for name, value in zip(names, args):
                if name in kwargs:
                    raise MaskforgeError(f"{built.__label__}: {name} given twice")
                kwargs[name] = value
            try:
                init(self, **kwargs)
            except ValidationError as exc:
                raise MaskforgeError(describe(exc, built.__label__)) from None

        built.__init__ = __init__
        return built

    return wrap if cls is None else wrap(cls)


@functools.lru_cache(maxsize=None)
def _adapter(cls: type) -> TypeAdapter:
    return TypeAdapter(cls)


def parse(cls: type[T], data: Any, label: str) -> T:
    """Validate `data` (parsed JSON) as a `cls`, or raise `MaskforgeError` prefixed with `label`."""
    try:
        return _adapter(cls).validate_python(data)
    except ValidationError as exc:
        raise MaskforgeError(describe(exc, label)) from None


def check_format(raw: Any, name: str, version: int, label: str, kind: str) -> None:
    """The document's `format` and `format_version`, checked before anything else: a newer version asks
    for an upgrade instead of listing the fields this version does not know."""
    if not isinstance(raw, dict):
        raise MaskforgeError(f"{label}: the maskforge metadata is not a JSON object")
    if raw.get("format") != name:
        raise MaskforgeError(f"{label}: format is {quote(raw.get('format'))}, not {name!r}")
    try:
        found = to_integer(raw.get("format_version"))
    except ValueError:
        raise MaskforgeError(f"{label}: format_version is missing or not an integer") from None
    if found > version:
        raise MaskforgeError(
            f"{label} uses {kind} format version {found}, newer than this maskforge reads "
            f"({version}); upgrade maskforge"
        )
    if found != version:
        raise MaskforgeError(f"{label}: unsupported format version {found}")


def dump(value: Any) -> Any:
    """A record as plain JSON values (lists, dicts), leaving out fields that hold their default."""
    return _adapter(type(value)).dump_python(value, mode="json", exclude_defaults=True)


def json_schema(cls: type) -> dict:
    """The JSON Schema of a record (without pydantic's generated titles)."""

    def strip(node: Any) -> Any:
        if isinstance(node, dict):
            return {key: strip(value) for key, value in node.items() if key != "title"}
        if isinstance(node, list):
            return [strip(value) for value in node]
        return node

    return strip(_adapter(cls).json_schema())


def _bound(value: Any) -> str:
    return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)


_PHRASES: dict[str, Callable[[dict], str]] = {
    "greater_than": lambda ctx: f"must be > {_bound(ctx['gt'])}",
    "greater_than_equal": lambda ctx: f"must be >= {_bound(ctx['ge'])}",
    "less_than": lambda ctx: f"must be < {_bound(ctx['lt'])}",
    "less_than_equal": lambda ctx: f"must be <= {_bound(ctx['le'])}",
    "literal_error": lambda ctx: f"must be one of {ctx['expected']}",
    "too_short": lambda ctx: f"must have at least {ctx['min_length']} item(s)",
    "too_long": lambda ctx: f"must have at most {ctx['max_length']} item(s)",
    "string_type": lambda ctx: "must be a string",
    "bool_type": lambda ctx: "must be true or false",
    "list_type": lambda ctx: "must be a list",
    "tuple_type": lambda ctx: "must be a list",
    "dict_type": lambda ctx: "must be an object",
    "dataclass_type": lambda ctx: "must be an object",
    "dataclass_args_type": lambda ctx: "must be an object",
}


def describe(exc: ValidationError, label: str) -> str:
    """One line for the first error: `label: <field> <problem>, got <value>`."""
    error = exc.errors(include_url=False)[0]
    where = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in error["loc"]).lstrip(".")
    where = printable(where, limit=QUOTE_LIMIT)  # field names come from the file: a key may be 99 MB of escapes
    kind, ctx = error["type"], error.get("ctx") or {}
    if kind == "missing":
        return f"{label}: field {where} is missing"
    if kind in ("extra_forbidden", "unexpected_keyword_argument"):
        return f"{label}: unknown field {where}"
    if kind in ("value_error", "assertion_error"):
        problem = str(ctx.get("error", error["msg"]))
    elif kind in _PHRASES:
        problem = _PHRASES[kind](ctx)
    else:
        problem = error["msg"][0].lower() + error["msg"][1:]
    if not where:  # a check across fields: its message says everything
        return f"{label}: {problem}"
    if isinstance(error["input"], (dict, list, tuple)):  # the message names what is wrong inside it
        return f"{label}: {where} {problem}"
    shown = quote(error["input"], limit=80)
    return f"{label}: {where} {problem}, got {shown}"

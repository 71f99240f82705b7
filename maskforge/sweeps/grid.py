"""A sweep's grid: which search arguments vary (axes), which stay fixed, the points and their folder names.

A grid is given as `{search option: value or list of values}` (the options are `SearchConfig` fields;
`seed` takes a list of seeds). Lists are axes, single values are fixed. The options that define a point
of the paper's figures — arch, init, scale_fan, width, topk, k, seed — are always axes (a single value
counts as a list of one), so a point's folder name always says them and stays the same when a later run
of the sweep adds values:

    arch=conv4,init=signed_constant,scale_fan=true,width=1.0,topk=layer,k=0.5,seed=0

The folder records every grid run in it (`sweep.json`). A new run with the same fixed options and the
same axes EXTENDS the folder (its points are added; finished ones are skipped); one with different fixed
options or different axes is refused, since its points would not be comparable (docs/SWEEP.md).
"""

from __future__ import annotations

import itertools
import json
import re
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..registry import check_width, get_arch
from ..dense import RECIPE, DenseConfig
from ..errors import MaskforgeError
from ..fileio import atomic_write
from ..jsonread import strict_json
from ..runfiles import SWEEP_FILE
from ..schema import RESUME_OVERRIDABLE, SearchConfig, field_kind
from ..spelling import spell
from ..textguard import QUOTE_LIMIT, printable

#: Version 2: topk became a named axis (version-1 folder names do not say it).
SWEEP_FORMAT, SWEEP_VERSION = "maskforge-sweep", 2
#: Always axes, in folder-name order; any other listed option goes before k.
NAMED_AXES = ("arch", "init", "scale_fan", "width", "topk", "k", "seed")
#: Axis values that stand for a default (None: "the architecture's"), spelled out so a folder name says it.
AXIS_DEFAULTS = {"width": 1.0}
#: Options a re-run may change without changing any result (they are not part of the grid's identity).
RUN_ONLY = tuple(RESUME_OVERRIDABLE)
#: The search options a dense baseline shares (the others are the edge-popup recipe's).
DENSE_SHARED = tuple(
    f.name for f in fields(DenseConfig) if f.name in {g.name for g in fields(SearchConfig)} and f.name not in RECIPE
)
_TYPES = typing.get_type_hints(SearchConfig)
_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")
_SAFE = re.compile(r"[^A-Za-z0-9._+-]")


@dataclass(frozen=True)
class Point:
    """One run of a sweep: a search (`config` is a SearchConfig) or a dense baseline (a DenseConfig)."""

    name: str
    kind: str  # "search" or "dense"
    values: dict  # the axis values that name it
    config: Any


@dataclass
class Grid:
    axes: dict[str, list]  # axis -> values, in folder-name order
    fixed: dict[str, Any]  # every other SearchConfig field except `out`
    dense_baseline: bool = False  # also train the dense baseline once per (arch, width, seed, ...)

    def search_points(self, out: Path) -> list[Point]:
        points = []
        for combo in itertools.product(*self.axes.values()):
            values = dict(zip(self.axes, combo))
            name = point_name(values)
            config = _point_config(name, {**self.fixed, **values, "out": str(out / name)})
            points.append(Point(name, "search", values, config))
        return points

    def dense_points(self, out: Path) -> list[Point]:
        if not self.dense_baseline:
            return []
        points: dict[str, Point] = {}
        for point in self.search_points(out):
            values = {axis: value for axis, value in point.values.items() if axis in DENSE_SHARED}
            name = "dense," + point_name(values)
            points.setdefault(name, Point(name, "dense", values, DenseConfig.like(point.config, out=str(out / name))))
        return list(points.values())

    def points(self, out: Path) -> list[Point]:
        """Every point, searches first (in grid order, the last axis varying fastest), then dense baselines."""
        return self.search_points(out) + self.dense_points(out)

    def to_json(self) -> dict:
        return {"axes": self.axes, "dense_baseline": self.dense_baseline}


def point_name(values: Mapping[str, Any]) -> str:
    """`axis=value,...` with values spelled as in JSON (floats always with a point) and path-safe."""
    return ",".join(f"{axis}={_SAFE.sub('_', spell(value, exact=True))}" for axis, value in values.items())


# --- building and checking a grid ------------------------------------------------------------------------


def make_grid(options: Mapping[str, Any], *, dense_baseline: bool = False) -> Grid:
    """A validated Grid from `{option: value or list}` (every point's SearchConfig is checked now)."""
    known = set(_TYPES) - {"out"}
    unknown = sorted(set(options) - known)
    if unknown:
        raise MaskforgeError(
            f"unknown sweep option(s) {unknown}; the options are the search's: {', '.join(sorted(known))}"
        )
    defaults = {**SearchConfig().to_dict(), **AXIS_DEFAULTS}
    axes: dict[str, list] = {}
    fixed: dict[str, Any] = {}
    for name in sorted(known):
        given = options.get(name, defaults[name])
        if isinstance(given, (list, tuple)) or name in NAMED_AXES:
            axes[name] = _check_values(name, list(given) if isinstance(given, (list, tuple)) else [given])
        else:
            fixed[name] = _coerce(name, given)
    order = [n for n in NAMED_AXES if n not in ("k", "seed")] + sorted(set(axes) - set(NAMED_AXES)) + ["k", "seed"]
    grid = Grid({name: axes[name] for name in order if name in axes}, fixed, dense_baseline)
    names = set()
    for point in grid.points(Path(".")):  # builds (so validates) every point's config
        if point.name in names:
            raise MaskforgeError(
                f"two grid points share the folder name {point.name}; use values that differ "
                f"in letters, digits or . _ + -"
            )
        names.add(point.name)
    return grid


def _point_config(name: str, values: dict) -> SearchConfig:
    """A point's SearchConfig, validated by the schema and the architecture registry; errors name the point."""
    try:
        config = SearchConfig(**values)
        get_arch(config.arch)
        check_width(1.0 if config.width is None else config.width, config.arch)
    except MaskforgeError as exc:
        raise MaskforgeError(f"grid point {name}: {exc}") from None
    return config


def _check_values(name: str, values: list) -> list:
    if not values:
        raise MaskforgeError(f"{name}: the list of values is empty")
    coerced = [_coerce(name, value) for value in values]
    duplicates = sorted({spell(v, exact=True) for v in coerced if coerced.count(v) > 1})
    if duplicates:
        raise MaskforgeError(f"{name}: value(s) {', '.join(duplicates)} listed twice")
    return coerced


def _coerce(name: str, value: Any) -> Any:
    """`value` spelled as the field's type, so that 1 and 1.0 name the same point (k=1.0); whether it is a
    valid value is the schema's to say, when the point's config is built."""
    base, _ = field_kind(name)
    if value is None and name in AXIS_DEFAULTS:
        return AXIS_DEFAULTS[name]
    if base is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if base is int and isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def parse_list(name: str, text: str) -> list:
    """A comma list from the command line as values of the search option `name` (e.g. '0.1,0.3')."""
    if name not in _TYPES or name == "out":
        raise MaskforgeError(f"unknown search option {name!r}")
    # a builder's JSON arguments hold commas of their own: one value, never a list
    items = [str(text).strip()] if name == "arch_args" else [item.strip() for item in str(text).split(",")]
    if not text.strip() or any(not item for item in items):
        raise MaskforgeError(f"{name}: malformed list {text!r} (values separated by commas, none empty)")
    return _check_values(name, [_parse_one(name, item) for item in items])


def _parse_one(name: str, item: str) -> Any:
    base, optional = field_kind(name)
    if item.lower() == "none" and optional:
        return None
    if base is bool:
        if item.lower() in _TRUE + _FALSE:
            return item.lower() in _TRUE
        raise MaskforgeError(f"{name}: {item!r} is not true/false (or yes/no, on/off, 1/0)")
    try:
        return base(item)
    except ValueError:
        raise MaskforgeError(f"{name}: {item!r} is not {'an integer' if base is int else 'a number'}") from None


def options_from_text(texts: Mapping[str, str | None], seeds: str | None = None) -> dict:
    """Sweep options from command-line text: `{option: 'v1,v2' or None}` -> a value or a list per option
    given (one value of a non-axis option is a fixed option), plus `seed` from `seeds` (see parse_seeds)."""
    options: dict[str, Any] = {}
    for name, text in texts.items():
        if text is not None:
            values = parse_list(name, text)
            options[name] = values[0] if len(values) == 1 else values
    if seeds is not None:
        options["seed"] = parse_seeds(seeds)
    return options


def parse_where(items: Sequence[str]) -> dict[str, list]:
    """['init=signed_constant', 'k=0.1,0.5'] -> {'init': ['signed_constant'], 'k': [0.1, 0.5]}."""
    where: dict[str, list] = {}
    for item in items:
        name, sep, text = str(item).partition("=")
        if not sep or not name.strip():
            raise MaskforgeError(f"where: {item!r} is not OPTION=VALUE[,VALUE...]")
        where[name.strip()] = parse_list(name.strip(), text)
    return where


def parse_seeds(text: str) -> list[int]:
    """'3' -> the seeds 0, 1, 2; '0,5,9' -> those seeds; '7:10' -> 7, 8, 9."""
    text = str(text).strip()
    try:
        if re.fullmatch(r"\d+", text):
            count = int(text)
            if count < 1:
                raise MaskforgeError("seeds: the count must be at least 1")
            return list(range(count))
        if re.fullmatch(r"\d+:\d+", text):
            start, stop = (int(part) for part in text.split(":"))
            if stop <= start:
                raise MaskforgeError(f"seeds: the range {text} is empty (write START:STOP with STOP > START)")
            return list(range(start, stop))
    except ValueError:  # pragma: no cover - the patterns above admit only digits
        pass
    if "," not in text:
        raise MaskforgeError(f"seeds: {text!r} is neither a count (3), a list (0,5,9) nor a range (7:10)")
    return parse_list("seed", text)


def parse_shard(text: str) -> tuple[int, int]:
    """'I/N' -> (I, N) with 0 <= I < N."""
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(text))
    if not match:
        raise MaskforgeError(f"shard must be I/N (e.g. 0/4), got {text!r}")
    index, count = int(match.group(1)), int(match.group(2))
    if count < 1 or index >= count:
        raise MaskforgeError(
            f"shard {index}/{count}: I must be in 0..N-1 (the shards of N are 0/N ... {max(count, 1) - 1}/N)"
        )
    return index, count


def check_figure_axes(axes: Sequence[str], x: str | None, hue: Sequence[str] | None) -> None:
    """A figure's x and hue must be axes of the sweep (checked before a sweep runs, not after)."""
    for name in ([x] if x else []) + list(hue or []):
        if name not in axes:
            raise MaskforgeError(f"cannot plot by {name!r}: the sweep's axes are {', '.join(axes)}")
    if x and hue and x in hue:
        raise MaskforgeError(f"{x!r} cannot be both the x axis and a hue")


# --- the folder's record of its grids --------------------------------------------------------------------


@dataclass
class SweepRecord:
    """What `DIR/sweep.json` holds: the fixed options, the axis names, and every grid run in the folder."""

    fixed: dict
    axes: list[str]
    grids: list[Grid] = field(default_factory=list)

    def points(self, out: Path) -> list[Point]:
        """Every point of every recorded grid, each once, in the order the grids first listed them."""
        seen: dict[str, Point] = {}
        for grid in self.grids:
            for point in grid.points(out):
                seen.setdefault(point.name, point)
        return list(seen.values())


def read_record(out: Path) -> SweepRecord | None:
    path = out / SWEEP_FILE
    if not path.exists():
        return None
    try:
        document = strict_json(path.read_bytes(), str(path), "the sweep record")
        if document.get("format") == SWEEP_FORMAT and document.get("version") == 1:
            raise MaskforgeError(
                "written by an older maskforge (sweep format 1, whose folder names do not say "
                "topk); run the sweep again in a new folder"
            )
        if document.get("format") != SWEEP_FORMAT or document.get("version") != SWEEP_VERSION:
            raise ValueError(f"not a {SWEEP_FORMAT} v{SWEEP_VERSION} document")
        fixed, axes = dict(document["fixed"]), list(document["axes"])
        grids = [
            make_grid({**fixed, **{a: list(v) for a, v in g["axes"].items()}}, dense_baseline=bool(g["dense_baseline"]))
            for g in document["grids"]
        ]
    except MaskforgeError as exc:
        message = str(exc)
        raise MaskforgeError(message if message.startswith(str(path)) else f"{path}: {message}") from None
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise MaskforgeError(f"cannot read {path}: {printable(exc, limit=QUOTE_LIMIT)}") from None
    return SweepRecord(fixed, axes, grids)


def record_grid(out: Path, grid: Grid) -> SweepRecord:
    """Add `grid` to the folder's record (creating it), or refuse a grid whose points are not comparable."""
    record = read_record(out)
    if record is None:
        record = SweepRecord(grid.fixed, list(grid.axes))
    else:
        _check_comparable(out, record, grid)
    if any(g.to_json() == grid.to_json() for g in record.grids):
        return record
    record.grids.append(grid)
    document = {
        "format": SWEEP_FORMAT,
        "version": SWEEP_VERSION,
        "fixed": record.fixed,
        "axes": record.axes,
        "grids": [g.to_json() for g in record.grids],
    }
    atomic_write(out / SWEEP_FILE, json.dumps(document, indent=2) + "\n")
    return record


def _check_comparable(out: Path, record: SweepRecord, grid: Grid) -> None:
    if list(grid.axes) != record.axes:
        raise MaskforgeError(
            f"sweep folder {out} varies {', '.join(record.axes)}; this grid varies "
            f"{', '.join(grid.axes)}: choose another output folder"
        )
    defaults = SearchConfig().to_dict()
    differing = [
        f"{name} {record.fixed.get(name, defaults.get(name))!r} (this grid: {grid.fixed.get(name)!r})"
        for name in sorted(set(record.fixed) | set(grid.fixed))
        if name not in RUN_ONLY and record.fixed.get(name, defaults.get(name)) != grid.fixed.get(name)
    ]
    if differing:
        raise MaskforgeError(
            f"sweep folder {out} was made with other fixed options: {'; '.join(differing)}; "
            f"rerun with the recorded values to extend it, or choose another output folder"
        )

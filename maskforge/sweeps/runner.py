"""Running a sweep: every point of the grid (or of one shard) one after another, skipping finished points,
resuming interrupted ones from their checkpoint, and carrying on past a point that fails.

    >>> import maskforge
    >>> result = maskforge.sweep("runs/fig3", {"arch": "conv4", "k": [0.1, 0.3, 0.5, 0.7, 0.9],
    ...                                        "seed": [0, 1], "scale_fan": True, "epochs": 10},
    ...                          dense_baseline=True)                                # doctest: +SKIP
    >>> result.ok, result.figures                                                    # doctest: +SKIP
    (True, [PosixPath('runs/fig3/accuracy_vs_k.png'), PosixPath('runs/fig3/accuracy_vs_k.svg')])
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from .. import distributed
from ..dense import train_dense
from ..errors import MaskforgeError
from ..fileio import ensure_writable_dir
from ..searches import search
from .figure import plot_sweep  # matplotlib itself loads only when a figure is drawn
from .grid import DENSE_SHARED, Point, SweepRecord, check_figure_axes, make_grid, read_record, record_grid
from .results import BUG_PREFIX, is_done, point_row, read_status, summarize, write_results, write_status

log = logging.getLogger(__name__)

#: on_point(event, point, info): event "start" (info: index, total) or "end" (info: outcome, seconds, row)
PointCallback = Callable[[str, Point, dict], None]
#: on_step(StepProgress): after every optimizer step of the point being run (maskforge.searches.StepProgress)
StepCallback = Callable[[Any], None]
#: on_epoch(record): after every epoch of the point being run (the record metrics.jsonl gets)
EpochCallback = Callable[[dict], None]


@dataclass
class SweepResult:
    out: Path
    axes: list[str]
    rows: list[dict]  # every point of the folder, as in results.csv
    summary: list[dict]  # mean +- std over seeds (see results.summarize)
    ran: list[str] = field(default_factory=list)  # points run (or resumed) by this call
    skipped: list[str] = field(default_factory=list)  # points already finished
    failed: list[str] = field(default_factory=list)  # points whose run failed in this call
    figures: list[Path] = field(default_factory=list)
    figure_note: str = ""  # why no figure was drawn, if none was

    @property
    def ok(self) -> bool:
        """True when no point of the folder is failed (pending points of other shards are not failures)."""
        return not any(row["status"] == "failed" for row in self.rows)


def sweep(
    out: str | os.PathLike,
    options: Mapping[str, Any],
    *,
    dense_baseline: bool = False,
    shard: tuple[int, int] = (0, 1),
    on_step: StepCallback | None = None,
    on_point: PointCallback | None = None,
    on_epoch: EpochCallback | None = None,
    figures: bool = True,
    x: str | None = None,
    hue: Sequence[str] | None = None,
) -> SweepResult:
    """Run the grid `options` ({search option: value or list}) under `out`; see the module docstring.

    Each point is an ordinary search run folder `out/<axis=value,...>` (dense baselines: `out/dense,...`).
    `shard=(i, n)` runs only the points whose index in the grid is i modulo n. Afterwards `out/results.csv`
    lists every point of the folder, and the figure of this grid is drawn once none of its points is pending.
    """
    world = distributed.detect()
    if world.is_distributed:
        raise MaskforgeError(
            "a sweep runs its points in one process; to use several GPUs or machines, start one "
            "process per shard (--shard I/N; Python: shard=(i, n)) instead of torchrun"
        )
    index, count = shard
    if not (isinstance(index, int) and isinstance(count, int) and 0 <= index < count):
        raise MaskforgeError(f"shard must be (i, n) with 0 <= i < n, got {shard!r}")
    out = Path(out)
    grid = make_grid(options, dense_baseline=dense_baseline)
    check_figure_axes(list(grid.axes), x, hue)  # before anything runs, not after hours of it
    ensure_writable_dir(out)
    record = record_grid(out, grid)
    points = grid.points(out)
    result = SweepResult(out, list(grid.axes), [], [])
    mine = points[index::count]
    rows: dict[str, dict] = {}
    for position, point in enumerate(mine):
        if on_point:
            on_point("start", point, {"index": position, "total": len(mine)})
        started = time.perf_counter()
        outcome, row = _run_point(point, out, on_step, on_epoch)
        if outcome in ("failed", "bug"):
            result.failed.append(point.name)
        else:
            (result.ran if outcome == "ran" else result.skipped).append(point.name)
        # once per point: reading a row loads and checks the artifact (a skipped point's was read to skip it)
        rows[point.name] = row or point_row(point, out)
        if on_point:
            on_point(
                "end",
                point,
                {
                    "outcome": "failed" if outcome == "bug" else outcome,
                    "seconds": time.perf_counter() - started,
                    "row": rows[point.name],
                },
            )
    return _finish(out, record, result, [p.name for p in points], _Figure(figures, x, hue), rows)


def collect_sweep(
    out: str | os.PathLike,
    *,
    figures: bool = True,
    x: str | None = None,
    hue: Sequence[str] | None = None,
    stem: str | os.PathLike | None = None,
    where: Mapping[str, Sequence] | None = None,
) -> SweepResult:
    """Gather the results of every point in the sweep folder `out` (e.g. after its shards finished):
    rewrite `out/results.csv`, summarize, and draw the figure of every point (or, with `where`
    ({option: accepted values}), of the points that match). Nothing is run."""
    out = Path(out)
    record = read_record(out)
    if record is None:
        raise MaskforgeError(f"{out} is not a sweep folder (no sweep.json)")
    check_figure_axes(record.axes, x, hue)
    result = SweepResult(out, list(record.axes), [], [])
    return _finish(
        out, record, result, [p.name for p in record.points(out)], _Figure(figures, x, hue, stem, dict(where or {}))
    )


@dataclass
class _Figure:
    """What figure a sweep or a collect draws."""

    draw: bool = True
    x: str | None = None
    hue: Sequence[str] | None = None
    stem: str | os.PathLike | None = None
    where: dict = field(default_factory=dict)  # option -> accepted values (dense rows: their options only)

    def selects(self, row: dict) -> bool:
        return all(
            row[key] in values for key, values in self.where.items() if row["kind"] == "search" or key in DENSE_SHARED
        )


def _finish(
    out: Path,
    record: SweepRecord,
    result: SweepResult,
    plotted: list[str],
    figure: _Figure,
    known: Mapping[str, dict] | None = None,
) -> SweepResult:
    """results.csv, the summary and the figure; `known` holds rows this call has already read."""
    known = known or {}
    result.rows = [known.get(point.name) or point_row(point, out) for point in record.points(out)]
    write_results(out, result.rows)
    result.summary = summarize(result.rows, result.axes)
    if figure.draw:
        plotted_names = set(plotted)
        rows = [row for row in result.rows if row["point"] in plotted_names and figure.selects(row)]
        waiting = sum(row["status"] in ("pending", "interrupted") for row in rows)
        if waiting:
            result.figure_note = f"no figure yet: {waiting} point(s) not finished (other shards?)"
        elif not any(row["status"] == "done" and row["kind"] == "search" for row in rows):
            result.figure_note = "no figure: no finished point" + (" matches the selection" if figure.where else "")
        else:
            result.figures = plot_sweep(rows, result.axes, out, x=figure.x, hue=figure.hue, stem=figure.stem)
    return result


def _run_point(
    point: Point, out: Path, on_step: StepCallback | None, on_epoch: EpochCallback | None
) -> tuple[str, dict | None]:
    """('skipped', its row) for a point finished earlier, else ('ran' | 'failed' (a MaskforgeError) | 'bug'
    (anything else), None)."""
    folder = out / point.name
    overwrite = False
    if is_done(point, folder):
        row = point_row(point, out)
        if row["status"] == "done":
            return "skipped", row
        # finished, but its records cannot be read: a failed point, which running the sweep again retries
        log.warning(
            "point %s is finished but damaged (%s); running it again (its files move to %s)",
            point.name,
            row["error"],
            folder / "previous-N",
        )
        overwrite = True
    previous = read_status(folder)
    wall, attempts = float(previous.get("wall_s", 0.0)), int(previous.get("attempts", 0)) + 1
    started = time.perf_counter()

    def note(error: str | None = None) -> None:
        # After every epoch, so a killed run loses at most one epoch of its recorded wall time.
        status = {"wall_s": wall + time.perf_counter() - started, "attempts": attempts, "error": error}
        write_status(ensure_writable_dir(folder), status)

    def epoch_done(record: dict) -> None:
        note()
        if on_epoch:
            on_epoch(record)

    note()  # a new attempt: an earlier attempt's error no longer describes the point
    try:
        if point.kind == "dense":
            train_dense(point.config, on_step=on_step, on_epoch=epoch_done)
        else:  # search decides (searches/plan.py): new, continued from a checkpoint, or started over
            search(point.config, on_step=on_step, on_epoch=epoch_done, overwrite=overwrite)
    except MaskforgeError as exc:
        note(" ".join(str(exc).split()))
        return "failed", None
    except Exception as exc:  # noqa: BLE001 - one broken point must not stop the sweep
        note(f"{BUG_PREFIX}{type(exc).__name__}: {' '.join(str(exc).split())} (a bug)")
        return "bug", None
    note()
    return "ran", None

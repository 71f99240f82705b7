"""A sweep's results: one row per point (read from its run folder), `results.csv`, and the summary.

A row says the point's every argument, its status (done, failed, interrupted, pending), its final and
best held-out accuracy, epochs, steps, wall time, artifact size and kept weights, and whether it LEARNED:
its final held-out accuracy is at least twice chance, or chance + a quarter of the way from chance to 100 %
if that is lower (chance = 1 / number of classes: 20 % for ten classes, 0.2 % for a thousand, 62.5 % for
two). Points that did not learn are kept in the table and marked, and the summary's mean and standard
deviation leave them out (docs/SWEEP.md).
"""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any, Iterable, Sequence

from ..artifact import load_artifact
from ..dense import RESULT_NAME
from ..errors import MaskforgeError
from ..fileio import atomic_write
from ..jsonread import strict_json
from ..metricfiles import read_metrics
from ..runfiles import RESULTS_FILE, STATUS_FILE
from ..searches import ARTIFACT_NAME, CONFIG_NAME, SearchConfig
from ..spelling import spell
from ..textguard import quote
from .grid import DENSE_SHARED, Point

#: Columns that measure time: the only ones that differ between two runs of the same grid.
TIMING_COLUMNS = ("wall_s",)
_OPTIONS = [f.name for f in fields(SearchConfig) if f.name != "out"]
COLUMNS = (
    ["point", "kind", "status", "learned"]
    + _OPTIONS
    + ["optimizer"]
    + [
        "heldout_acc",
        "best_heldout_acc",
        "best_epoch",
        "epochs_done",
        "steps",
        "wall_s",
        "artifact_bytes",
        "masked_weights",
        "kept_weights",
        "error",
    ]
)


def learned_threshold(num_classes: int) -> float:
    """The held-out accuracy a run must reach to count as learned: min(2 chance, chance + (1 - chance) / 4)."""
    chance = 1.0 / max(1, num_classes)
    return min(2.0 * chance, chance + (1.0 - chance) / 4.0)


def read_status(folder: Path) -> dict:
    """The point's `point.json`; {} when missing or unreadable (it only carries wall time and attempts)."""
    try:
        status = strict_json((folder / STATUS_FILE).read_bytes(), str(folder / STATUS_FILE), "the point status")
    except (OSError, MaskforgeError):
        return {}
    return status if isinstance(status, dict) else {}


def write_status(folder: Path, status: dict) -> None:
    atomic_write(folder / STATUS_FILE, json.dumps(status, indent=2, sort_keys=True) + "\n")


#: How a point's recorded error starts when the failure was not a MaskforgeError (a maskforge bug).
BUG_PREFIX = "unexpected "


def is_bug(row: dict) -> bool:
    """Whether a failed row's error was a maskforge bug rather than a problem the user can fix."""
    return str(row.get("error") or "").startswith(BUG_PREFIX)


def is_done(point: Point, folder: Path) -> bool:
    """A search is done once its artifact exists (written last); a dense baseline once dense.json does."""
    return (folder / (ARTIFACT_NAME if point.kind == "search" else RESULT_NAME)).is_file()


def point_row(point: Point, out: Path) -> dict:
    """The results.csv row of `point` from what its folder holds now."""
    folder = out / point.name
    row: dict[str, Any] = dict.fromkeys(COLUMNS, "")
    row.update(point=point.name, kind=point.kind)
    row.update(_arguments(point))
    status = read_status(folder)
    row["wall_s"] = status.get("wall_s", "")
    if is_done(point, folder):
        try:
            row.update(_finished(point, folder))
            row["status"] = "done"
        except MaskforgeError as exc:  # a damaged folder is reported, not fatal to the table
            row.update(status="failed", error=" ".join(str(exc).split()))
    elif status.get("error"):
        row.update(status="failed", error=status["error"])
    elif (folder / CONFIG_NAME).is_file():  # started (written once data and network were ready), not finished
        row["status"] = "interrupted"
    else:
        row["status"] = "pending"
    return row


def _arguments(point: Point) -> dict:
    values = asdict(point.config)
    if point.kind == "search":
        return {**{name: values[name] for name in _OPTIONS}, "optimizer": "sgd"}
    shared = {name: values[name] for name in _OPTIONS if name in values}
    shared["optimizer"] = values["optimizer"]
    if values["optimizer"] != "sgd":
        shared["momentum"] = ""
    return shared


def _finished(point: Point, folder: Path) -> dict:
    metrics = read_metrics(folder)
    if point.kind == "search":
        artifact = load_artifact(folder / ARTIFACT_NAME)
        sizes = {
            "artifact_bytes": artifact.file_bytes,
            "masked_weights": artifact.masked_weights,
            "kept_weights": artifact.kept_weights,
        }
        classes = artifact.spec.num_classes
    else:
        try:
            result = strict_json((folder / RESULT_NAME).read_bytes(), str(folder / RESULT_NAME), "the result")
            sizes = {"masked_weights": int(result["weights"]), "kept_weights": int(result["weights"])}
            classes = int(result["num_classes"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise MaskforgeError(f"cannot read {folder / RESULT_NAME}: {quote(exc)}") from None
    final = _accuracy(metrics[-1]) if metrics else math.nan
    accuracies = [_accuracy(m) for m in metrics]
    finite = [(acc, index) for index, acc in enumerate(accuracies) if math.isfinite(acc)]
    best, best_index = max(finite, key=lambda pair: (pair[0], -pair[1])) if finite else (math.nan, -1)
    return {
        **sizes,
        "heldout_acc": final,
        "best_heldout_acc": best,
        "best_epoch": metrics[best_index]["epoch"] if finite else "",
        "epochs_done": len(metrics),
        "steps": metrics[-1]["step"] if metrics else 0,
        "learned": math.isfinite(final) and final >= learned_threshold(classes),
    }


def _accuracy(record: dict) -> float:
    value = record.get("heldout_acc")
    return float(value) if isinstance(value, (int, float)) else math.nan


# --- results.csv -----------------------------------------------------------------------------------------


def write_results(out: Path, rows: Sequence[dict]) -> Path:
    """`out/results.csv`: a header of COLUMNS, then one row per point (numbers as Python spells them)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({key: spell(row.get(key, ""), exact=True) for key in COLUMNS})
    return atomic_write(out / RESULTS_FILE, buffer.getvalue())


def read_results(path: Path) -> list[dict]:
    """The rows of a results.csv, with numbers and booleans parsed back."""
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            return [{key: _parse_cell(value) for key, value in row.items()} for row in csv.DictReader(handle)]
    except OSError as exc:
        raise MaskforgeError(f"cannot read {path}: {exc.strerror or exc}") from None


def _parse_cell(text: str) -> Any:
    if text in ("true", "false"):
        return text == "true"
    if text == "none":
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


# --- the summary: mean +- std over seeds -----------------------------------------------------------------


def summarize(rows: Iterable[dict], axes: Sequence[str]) -> list[dict]:
    """One group per combination of `axes` other than seed (searches, then dense baselines).

    Each group: its axis values, `runs` (rows), `done`, `failed`, `not_learned`, and the mean and sample
    standard deviation (n - 1; 0 for one run) of the final held-out accuracy over the runs that learned.
    """
    keys = [axis for axis in axes if axis != "seed"]
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        group_keys = keys if row["kind"] == "search" else [k for k in keys if k in DENSE_SHARED]
        groups.setdefault((row["kind"],) + tuple((k, row[k]) for k in group_keys), []).append(row)
    summary = []
    for (kind, *pairs), members in groups.items():
        learned = [float(r["heldout_acc"]) for r in members if r["status"] == "done" and r["learned"] is True]
        summary.append(
            {
                "kind": kind,
                "values": dict(pairs),
                "runs": len(members),
                "done": sum(r["status"] == "done" for r in members),
                "failed": sum(r["status"] == "failed" for r in members),
                "not_learned": sum(r["status"] == "done" and r["learned"] is not True for r in members),
                "learned": len(learned),
                "mean": statistics.fmean(learned) if learned else math.nan,
                "std": statistics.stdev(learned) if len(learned) > 1 else (0.0 if learned else math.nan),
                "wall_s": sum(float(r["wall_s"]) for r in members if r["wall_s"] not in ("", None)),
            }
        )
    return summary

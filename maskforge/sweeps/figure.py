"""A sweep's figure: held-out accuracy against any grid axis, with the dense baseline.

`plot_sweep(rows, axes, folder, x="k", hue=["arch"])` draws the paper's Figure 3 layout: held-out accuracy
against `x`, one line per `hue` combination with mean +- one standard deviation over seeds as a band, the
dense baseline as a horizontal line (or, when `x` is one of its own axes such as width, as a dashed line),
and every point that did not learn as a red cross outside the mean. It writes a PNG and an SVG
(maskforge.figures).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Sequence

from ..figures import pyplot, save_figure
from ..spelling import spell
from .grid import DENSE_SHARED, check_figure_axes
from .results import summarize

NOT_LEARNED_COLOR = "#d62728"
_LABELS = {
    "k": "weights kept, k (% of each layer)",
    "width": "width multiplier (x the paper's layer widths)",
    "seed": "seed",
    "epochs": "epochs",
    "lr": "peak learning rate",
}


# --- a sweep -----------------------------------------------------------------------------------------


def default_axes(rows: Sequence[dict], axes: Sequence[str], x: str | None = None) -> tuple[str, list[str]]:
    """x (unless given): k if it varies, else the first varying axis; hue: the other varying axes (never
    the seed)."""
    searches = [row for row in rows if row["kind"] == "search"]
    varying = [a for a in axes if a != "seed" and len({_key(row[a]) for row in searches}) > 1]
    x = x or ("k" if "k" in varying or not varying else varying[0])
    return x, [a for a in varying if a != x]


def plot_sweep(
    rows: Sequence[dict],
    axes: Sequence[str],
    folder: str | os.PathLike,
    *,
    x: str | None = None,
    hue: Sequence[str] | None = None,
    stem: str | os.PathLike | None = None,
) -> list[Path]:
    """Draw held-out accuracy against `x` for the results `rows`; returns the PNG and SVG paths."""
    default_x, default_hue = default_axes(rows, axes)
    x = x or default_x
    hue = list(default_hue if hue is None else hue)
    check_figure_axes(axes, x, hue)
    # An axis that varies among the rows but is neither x nor a hue would be averaged in silently: never.
    hue += [axis for axis in default_axes(rows, axes, x)[1] if axis not in hue]
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.2, 4.6))
    done = [row for row in rows if row["status"] == "done"]
    positions = _positions([row[x] for row in done if row["kind"] == "search" or x in DENSE_SHARED])
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    searches = _group([row for row in done if row["kind"] == "search"], hue, ordered=True)
    for index, (values, members) in enumerate(searches.items()):
        _draw_series(ax, members, x, positions, colors[index % len(colors)], _hue_label(hue, values))
    dense_hue = [h for h in hue if h in DENSE_SHARED]
    for values, members in _group([row for row in done if row["kind"] == "dense"], dense_hue).items():
        shared = len(searches) <= 1 or not dense_hue  # one baseline for every line: black
        color = "black" if shared else _matching_color(dict(zip(dense_hue, values)), hue, searches, colors)
        _draw_dense(ax, members, x, positions, color, _hue_label(dense_hue, values))
    _draw_not_learned(ax, done, x, positions)
    failed = sum(row["status"] == "failed" for row in rows)
    _finish_axes(ax, rows, axes, x, hue, positions, failed)
    stem_path = Path(folder) / (stem or f"accuracy_vs_{x}" + (f"_by_{'_'.join(hue)}" if hue else ""))
    paths = save_figure(fig, stem_path)
    plt.close(fig)
    return paths


def _key(value: Any) -> str:
    return json.dumps(value)


def _positions(values: list) -> dict[str, float]:
    """x position of each value: itself when all are numbers (k drawn in %), else its rank."""
    distinct = {_key(v): v for v in values}
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in distinct.values()):
        return {key: float(v) for key, v in distinct.items()}
    return {key: float(i) for i, key in enumerate(sorted(distinct, key=lambda k: str(distinct[k])))}


def _group(rows: Sequence[dict], keys: Sequence[str], ordered: bool = False) -> dict[tuple, list[dict]]:
    """Rows by their values of `keys` (with `ordered`, groups sorted by those values: a stable legend)."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault(tuple(row.get(k) for k in keys), []).append(row)
    if ordered:
        groups = dict(sorted(groups.items(), key=lambda item: [_sort_key(v) for v in item[0]]))
    return groups


def _sort_key(value: Any) -> tuple:
    return (0, value, "") if isinstance(value, (int, float)) else (1, 0, str(value))


def _learned_stats(members: Sequence[dict], x: str | None, positions: dict) -> list[tuple[float, float, float, int]]:
    """(x position, mean %, std %, n) per x value over the rows that learned (the summary's statistics)."""
    stats = [
        (
            positions[_key(group["values"][x])] if x else 0.0,
            100.0 * group["mean"],
            100.0 * group["std"],
            group["learned"],
        )
        for group in summarize(members, [x] if x else [])
        if group["learned"]
    ]
    return sorted(stats)


def _scale(x: str, position: float) -> float:
    return 100.0 * position if x == "k" else position


def _draw_series(ax, members, x, positions, color, label) -> None:
    stats = _learned_stats(members, x, positions)
    if not stats:
        return
    xs = [_scale(x, s[0]) for s in stats]
    means = [s[1] for s in stats]
    ax.plot(xs, means, marker="o", color=color, label=label or "edge-popup (mean)")
    ax.fill_between(xs, [s[1] - s[2] for s in stats], [s[1] + s[2] for s in stats], color=color, alpha=0.2, linewidth=0)


def _draw_dense(ax, members, x, positions, color, hue_label: str) -> None:
    recipe = f"{members[0]['optimizer']} lr {spell(members[0]['lr'])}"
    label = f"dense baseline, learned weights ({recipe}{', ' + hue_label if hue_label else ''})"
    if x in DENSE_SHARED and len({_key(r[x]) for r in members}) > 1:
        stats = _learned_stats(members, x, positions)
        xs = [_scale(x, s[0]) for s in stats]
        ax.plot(xs, [s[1] for s in stats], linestyle="--", marker="s", color=color, label=label)
        ax.fill_between(
            xs, [s[1] - s[2] for s in stats], [s[1] + s[2] for s in stats], color=color, alpha=0.1, linewidth=0
        )
        return
    stats = _learned_stats(members, None, positions)
    if stats:
        _, mean, std, n = stats[0]
        ax.axhline(mean, linestyle="--", color=color, label=f"{label}: {mean:.1f} ± {std:.1f} % (n={n})")
        ax.axhspan(mean - std, mean + std, color=color, alpha=0.08, linewidth=0)


def _draw_not_learned(ax, rows, x, positions) -> None:
    failures = [row for row in rows if row["learned"] is not True and row.get(x) not in (None, "")]
    if not failures:
        return
    xs = [_scale(x, positions[_key(row[x])]) for row in failures]
    ys = [100.0 * float(row["heldout_acc"]) if _finite(row["heldout_acc"]) else 0.0 for row in failures]
    ax.scatter(
        xs,
        ys,
        marker="x",
        s=60,
        color=NOT_LEARNED_COLOR,
        zorder=5,
        label=f"did not learn, not in the mean ({len(failures)} run{'s' * (len(failures) > 1)})",
    )


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _matching_color(dense_values: dict, hue, searches, colors) -> str:
    """The color of the first search series whose hue values agree with the dense group's."""
    for index, search_values in enumerate(searches):
        if all(dense_values.get(h, v) == v for h, v in zip(hue, search_values)):
            return colors[index % len(colors)]
    return "black"


def _hue_label(hue: Sequence[str], values: Sequence) -> str:
    return ", ".join(f"{name}={spell(value)}" for name, value in zip(hue, values))


def _finish_axes(ax, rows, axes, x, hue, positions, failed: int) -> None:
    done = [row for row in rows if row["status"] == "done" and row["kind"] == "search"]
    numeric = all(isinstance(row[x], (int, float)) and not isinstance(row[x], bool) for row in done)
    names = {pos: key for key, pos in positions.items()}
    if not numeric:
        ax.set_xticks(sorted(names), [spell(json.loads(names[p])) for p in sorted(names)])
    elif len(names) <= 12:  # tick exactly the grid's values
        ax.set_xticks([_scale(x, p) for p in sorted(names)], [spell(_scale(x, p)) for p in sorted(names)])
    ax.set_xlabel(_LABELS.get(x, x.replace("_", " ")))
    ax.set_ylabel("held-out accuracy (%)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    ax.set_title(_title(rows, axes, x, hue, failed))


def _title(rows, axes, x, hue, failed: int) -> str:
    """What the data and recipe are: the data set, every single-valued option that matters, the seeds."""
    searches = [row for row in rows if row["kind"] == "search"] or list(rows)
    first = searches[0]
    constant = [a for a in axes if a not in (x, "seed", *hue) and len({_key(r[a]) for r in searches}) == 1]
    done = [row for row in searches if row["status"] == "done"] or searches
    per_point = sorted({len(members) for members in _group(done, [*hue, x]).values()})
    seeds = f"{per_point[0]}" if len(per_point) == 1 else f"{per_point[0]}–{per_point[-1]}"
    recipe = ", ".join(f"{a}={spell(first[a])}" for a in constant)
    budget = f"{first['epochs']} epoch{'s' * (first['epochs'] != 1)}"
    if first["max_steps"] not in ("", None):
        budget += f" (at most {first['max_steps']} steps)"
    line2 = (
        f"{recipe}; {budget}, batch {first['batch_size']}, SGD lr {spell(first['lr'])} cosine; "
        f"mean ± std over {seeds} seed{'s' * (seeds != '1')}"
    )
    note = f"; {failed} failed run{'s' * (failed > 1)} not shown" if failed else ""
    return f"Edge-popup on {Path(str(first['data'])).name}: held-out accuracy vs {x}{note}\n{line2}"

"""Sweeps: a grid of searches (and dense baselines) under one folder, their results table and figures.

`sweep(out, {option: value or list}, ...)` (also `maskforge.sweep`) is what `maskforge sweep` runs; `collect_sweep(out)` is
`maskforge sweep --collect`. The grid (`grid.py`), running it (`runner.py`) and its results table and
summary (`results.py`) and its figure (`figure.py`) each have their module.
"""

from .grid import Grid, Point, make_grid, options_from_text, parse_list, parse_seeds, parse_shard, parse_where
from .results import COLUMNS, RESULTS_FILE, learned_threshold, read_results, summarize
from .runner import SweepResult, collect_sweep, sweep

__all__ = [
    "sweep",
    "collect_sweep",
    "SweepResult",
    "Grid",
    "Point",
    "make_grid",
    "options_from_text",
    "parse_list",
    "parse_seeds",
    "parse_shard",
    "parse_where",
    "COLUMNS",
    "RESULTS_FILE",
    "learned_threshold",
    "read_results",
    "summarize",
]

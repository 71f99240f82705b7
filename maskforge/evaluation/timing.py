"""Latency, throughput, session start time and peak memory, and ratios between models measured together.

Latency is measured in this process (`time_calls`: warm-up, then alternating blocks per runtime or
mode, so a varying background load hits them alike). Session start and peak memory are measured in a
fresh child process that does nothing else (`probe.py`): onnxruntime allocates natively, so Python-level
tracing would miss it, and this process's high-water mark already holds the data set and PyTorch.

Models measured side by side are compared round by round (`median_ratio`): the median over rounds of
the ratio of their figures in that round, so that a load change between rounds hits both sides of each
ratio alike (a ratio of two medians would not cancel it).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .report import Latency

SETTLE_S = 0.3  # pause before a timing block: lets the other runtime's spinning threads go to sleep
PROBE_SCRIPT = Path(__file__).with_name("probe.py")
PROBE_TIMEOUT_S = 600
SESSION_STARTS = 3  # session creations per model (probe `starts`)

Blocks = list[list[float]]  # seconds of each timed call, one list per alternating block


def block_sizes(runs: int, rounds: int) -> list[int]:
    """`runs` timed calls split over at most `rounds` blocks, as evenly as possible (they sum to `runs`)."""
    runs = max(1, int(runs))
    rounds = max(1, min(rounds, runs))
    return [runs // rounds + (1 if index < runs % rounds else 0) for index in range(rounds)]


def time_calls(
    fns: dict[str, Callable[[], object]],
    runs: int,
    warmup: int,
    budget_s: float,
    rounds: int = 2,
    settle_s: float = SETTLE_S,
) -> dict[str, Blocks]:
    """Seconds per call of each function: exactly `runs` timed calls each, in `rounds` alternating blocks.

    Blocks, not call-by-call interleaving: onnxruntime's and PyTorch's (OpenMP) worker threads keep
    spinning for a moment after a call and would steal the cores from the other runtime's next call, so
    each block starts after a pause of `settle_s` (none is needed with one thread: there are no worker
    threads then). Alternating blocks (round r starts at function r mod n) still
    spread a varying background load over all functions. `warmup` untimed calls precede each function's
    first block (one precedes the later ones). A block stops early once it has used its share of
    `budget_s` and made at least 3 calls, so a slow model returns fewer than `runs` times rather than
    running for minutes. Returns, per function, the call times of each block.
    """
    names = list(fns)
    times: dict[str, Blocks] = {name: [] for name in names}
    blocks = block_sizes(runs, rounds)
    block_budget = budget_s / (len(blocks) * max(1, len(fns)))
    for round_index, per_block in enumerate(blocks):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            fn = fns[name]
            if len(fns) > 1 and settle_s > 0:
                time.sleep(settle_s)
            for _ in range(max(1, warmup) if round_index == 0 else 1):
                fn()
            block: list[float] = []
            started = time.perf_counter()
            for index in range(per_block):
                t0 = time.perf_counter()
                fn()
                block.append(time.perf_counter() - t0)
                if index + 1 >= 3 and time.perf_counter() - started > block_budget:
                    break
            times[name].append(block)
    return times


def latency_stats(runtime: str, batch: int, blocks: Blocks) -> Latency:
    ms = np.asarray([s for block in blocks for s in block], dtype=np.float64) * 1000.0
    p50, p90, p99 = (float(v) for v in np.percentile(ms, [50, 90, 99]))
    return Latency(
        runtime=runtime,
        batch=batch,
        runs=int(ms.size),
        p50_ms=p50,
        p90_ms=p90,
        p99_ms=p99,
        mean_ms=float(ms.mean()),
        images_per_s=batch * 1000.0 / p50,
        block_p50_ms=[1000.0 * float(np.median(block)) for block in blocks],
    )


def measure_latency(
    runners: dict[str, Callable[[np.ndarray], object]],
    batch: np.ndarray,
    batch_sizes: list[int],
    runs: int,
    warmup: int,
    budget_s: float,
    rounds: int = 2,
    threads: int = 2,
) -> dict[str, list[tuple[int, Blocks]]]:
    """Call times of every runner at every batch size (the first rows of `batch`), runners alternating;
    `threads` is the runners' intra-op thread count (with one, no pause is needed between blocks)."""
    out: dict[str, list[tuple[int, Blocks]]] = {name: [] for name in runners}
    for size in batch_sizes:
        x = np.ascontiguousarray(batch[:size])
        fns = {name: (lambda run=run, x=x: run(x)) for name, run in runners.items()}
        settle_s = SETTLE_S if threads > 1 else 0.0
        for name, blocks in time_calls(fns, runs, warmup, budget_s, rounds, settle_s).items():
            out[name].append((size, blocks))
    return out


def median_ratio(numerators: Sequence[float], denominators: Sequence[float]) -> float | None:
    """The median over rounds of numerator / denominator (None unless both have the same rounds)."""
    if not numerators or len(numerators) != len(denominators) or not all(d > 0 for d in denominators):
        return None
    return float(np.median(np.asarray(numerators, dtype=np.float64) / np.asarray(denominators, dtype=np.float64)))


def probe_footprint(
    onnx_path: str | Path, shape: tuple[int, int, int], batch_sizes: list[int], threads: int
) -> tuple[dict | None, str | None]:
    """Peak memory of `onnx_path` (`baseline_rss_bytes`, `peak_rss_bytes`, `model_rss_bytes`), measured in
    a fresh process that creates its session and runs one batch of each size.

    Returns (result, None), or (None, why) when the child failed: a missing figure is reported as such,
    it never fails the evaluation.
    """
    return probe_footprints([onnx_path], shape, batch_sizes, threads)[0]


def probe_footprints(
    onnx_paths: Sequence[str | Path], shape: tuple[int, int, int], batch_sizes: list[int], threads: int
) -> list[tuple[dict | None, str | None]]:
    """`probe_footprint` of each model, up to one process per CPU at a time (a process's own high-water
    mark does not depend on what runs beside it)."""

    def one(path) -> tuple[dict | None, str | None]:
        return _probe(
            [
                "memory",
                str(path),
                "--shape",
                ",".join(map(str, shape)),
                "--batches",
                ",".join(map(str, batch_sizes)),
                "--threads",
                str(threads),
            ],
            "memory probe",
        )

    with ThreadPoolExecutor(max_workers=max(1, min(len(onnx_paths), os.cpu_count() or 1))) as pool:
        return list(pool.map(one, onnx_paths))


def probe_session_starts(
    onnx_paths: Sequence[str | Path], threads: int, repeat: int = SESSION_STARTS
) -> tuple[dict[str, list[float]] | None, str | None]:
    """Milliseconds of `repeat` session creations of each model ({str(path): [ms, ...]}), the models taking
    turns in one fresh process (after onnxruntime's own start-up), or (None, why)."""
    result, why = _probe(
        ["starts", *map(str, onnx_paths), "--repeat", str(repeat), "--threads", str(threads)], "session-start probe"
    )
    return (result["session_start_ms"], None) if result is not None else (None, why)


def _probe(arguments: list[str], what: str) -> tuple[dict | None, str | None]:
    command = [sys.executable, str(PROBE_SCRIPT), *arguments]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=PROBE_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, f"{what} failed: {type(exc).__name__}"
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return None, f"{what} failed (exit {done.returncode}): {last[:200]}"
    try:
        return json.loads(lines[-1]), None
    except ValueError:
        return None, f"{what} printed no result"

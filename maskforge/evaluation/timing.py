"""Latency, throughput, session start time and peak memory.

Latency is measured in this process (`time_calls`: warm-up, then alternating blocks per runtime or
mode, so a varying background load hits them alike). Session start and peak memory are measured in a
fresh child process that does nothing else (`probe.py`): onnxruntime allocates natively, so Python-level
tracing would miss it, and this process's high-water mark already holds the data set and PyTorch.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np

from .report import Latency

SETTLE_S = 0.3   # pause before a timing block: lets the other runtime's spinning threads go to sleep
PROBE_SCRIPT = Path(__file__).with_name("probe.py")
PROBE_TIMEOUT_S = 600


def block_sizes(runs: int, rounds: int) -> list[int]:
    """`runs` timed calls split over at most `rounds` blocks, as evenly as possible (they sum to `runs`)."""
    runs = max(1, int(runs))
    rounds = max(1, min(rounds, runs))
    return [runs // rounds + (1 if index < runs % rounds else 0) for index in range(rounds)]


def time_calls(fns: dict[str, Callable[[], object]], runs: int, warmup: int, budget_s: float,
               rounds: int = 2) -> dict[str, list[float]]:
    """Seconds per call of each function: exactly `runs` timed calls each, in `rounds` alternating blocks.

    Blocks, not call-by-call interleaving: onnxruntime's and PyTorch's (OpenMP) worker threads keep
    spinning for a moment after a call and would steal the cores from the other runtime's next call, so
    each block starts after a short pause. Alternating blocks still spread a varying background load
    over all functions. `warmup` untimed calls precede each function's first block (one precedes the
    later ones). A block stops early once it has used its share of `budget_s` and made at least 3 calls,
    so a slow model returns fewer than `runs` times rather than running for minutes.
    """
    times: dict[str, list[float]] = {name: [] for name in fns}
    blocks = block_sizes(runs, rounds)
    block_budget = budget_s / (len(blocks) * max(1, len(fns)))
    for round_index, per_block in enumerate(blocks):
        for name, fn in fns.items():
            if len(fns) > 1:
                time.sleep(SETTLE_S)
            for _ in range(max(1, warmup) if round_index == 0 else 1):
                fn()
            started = time.perf_counter()
            for index in range(per_block):
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
                if index + 1 >= 3 and time.perf_counter() - started > block_budget:
                    break
    return times


def latency_stats(runtime: str, batch: int, seconds: list[float]) -> Latency:
    ms = np.asarray(seconds, dtype=np.float64) * 1000.0
    p50, p90, p99 = (float(v) for v in np.percentile(ms, [50, 90, 99]))
    return Latency(runtime=runtime, batch=batch, runs=int(ms.size), p50_ms=p50, p90_ms=p90, p99_ms=p99,
                   mean_ms=float(ms.mean()), images_per_s=batch * 1000.0 / p50)


def measure_latency(runners: dict[str, Callable[[np.ndarray], object]], batch: np.ndarray, batch_sizes: list[int],
                    runs: int, warmup: int, budget_s: float) -> dict[str, list[tuple[int, list[float]]]]:
    """Seconds per call of every runner at every batch size (the first rows of `batch`)."""
    out: dict[str, list[tuple[int, list[float]]]] = {name: [] for name in runners}
    for size in batch_sizes:
        x = np.ascontiguousarray(batch[:size])
        fns = {name: (lambda run=run, x=x: run(x)) for name, run in runners.items()}
        for name, seconds in time_calls(fns, runs, warmup, budget_s).items():
            out[name].append((size, seconds))
    return out


def probe_footprint(onnx_path: str | Path, shape: tuple[int, int, int], batch_sizes: list[int],
                    threads: int) -> tuple[dict | None, str | None]:
    """Session start (ms) and peak memory (bytes) of `onnx_path`, measured in a fresh process.

    Returns (result, None), or (None, why) when the child failed: a missing figure is reported as such,
    it never fails the evaluation.
    """
    command = [sys.executable, str(PROBE_SCRIPT), str(onnx_path), "--shape", ",".join(map(str, shape)),
               "--batches", ",".join(map(str, batch_sizes)), "--threads", str(threads)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=PROBE_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, f"memory probe failed: {type(exc).__name__}"
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return None, f"memory probe failed (exit {done.returncode}): {last[:200]}"
    try:
        return json.loads(lines[-1]), None
    except ValueError:
        return None, "memory probe printed no result"

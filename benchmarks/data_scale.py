#!/usr/bin/env python
"""Search at the scale of a real data set: images/s of search and of dense training, the data path's
share of a step, and peak memory, on Fashion-MNIST's 60,000 training images (any --data source works).

Each measurement runs in a fresh process (so that its peak memory is its own), search and dense
alternating per repetition so that both see the same machine load:

* `search`: `maskforge.search` with `max_steps=--steps` (the real loop: data, masked forward, backward,
  SGD on the scores), its steps timed through `on_step` after `--warmup` steps;
* `dense`: `maskforge.dense.train_dense` (the same loop, every weight trained with Adam), timed alike;
* `data path`: in the search's process, after its steps, the same number of batches drawn exactly as the
  search draws them (`iterate_batches`: shuffle, uint8 slice) and normalized (what `inputs()` does), with
  no network: its time per batch over the search's time per step is the share of a step spent outside
  forward/backward/optimizer;
* peak memory: the process's high-water RSS (VmHWM), data set and model included.

    python benchmarks/data_scale.py                               # fc (a full epoch) and conv4 (150 steps)
    python benchmarks/data_scale.py --arch conv4 --steps 60 --repeats 1 --json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _vmhwm_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _child(kind: str, arch: str, data: str, steps: int, warmup: int) -> dict:
    import torch

    from maskforge import SearchConfig, search
    from maskforge.data import iterate_batches, load_data, normalize
    from maskforge.dense import DenseConfig, train_dense

    stamps: list[float] = []

    def on_step(progress) -> None:
        stamps.append(time.perf_counter())

    with tempfile.TemporaryDirectory() as tmp:
        if kind == "search":
            search(SearchConfig(arch=arch, data=data, max_steps=steps, device="cpu", out=tmp), on_step=on_step)
        else:
            train_dense(DenseConfig(arch=arch, data=data, max_steps=steps, device="cpu"), on_step=on_step)
    timed = stamps[warmup:]
    step_s = (timed[-1] - timed[0]) / max(1, len(timed) - 1)
    record = {
        "kind": kind,
        "arch": arch,
        "steps": len(stamps),
        "step_s": step_s,
        "images_per_s": 128 / step_s,
        "peak_rss_mb": _vmhwm_mb(),
        "threads": torch.get_num_threads(),
    }
    if kind == "search":
        splits = load_data(data)
        started, count = time.perf_counter(), 0
        for images, _ in iterate_batches(splits.train, 128, shuffle=True, seed=0, epoch=0):
            normalize(images, splits.spec)
            count += 1
            if count >= len(timed):
                break
        record["data_s_per_batch"] = (time.perf_counter() - started) / count
        record["data_share"] = record["data_s_per_batch"] / step_s
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", action="append", help="fc and conv4 unless given (repeatable)")
    parser.add_argument("--data", default="fashion-mnist")
    parser.add_argument(
        "--steps", type=int, default=None, help="steps per run (default: fc 469 = an epoch, others 150)"
    )
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", action="store_true", help="one JSON line per run instead of a table")
    parser.add_argument("--child", nargs=2, metavar=("KIND", "ARCH"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(_child(args.child[0], args.child[1], args.data, args.steps, args.warmup)))
        return 0
    runs: list[dict] = []
    for arch in args.arch or ["fc", "conv4"]:
        steps = args.steps or (469 if arch == "fc" else 150)
        for repeat in range(args.repeats):
            order = ("search", "dense") if repeat % 2 == 0 else ("dense", "search")
            for kind in order:
                load = os.getloadavg()[0]
                out = subprocess.run(
                    [
                        sys.executable,
                        __file__,
                        "--child",
                        kind,
                        arch,
                        "--data",
                        args.data,
                        "--steps",
                        str(steps),
                        "--warmup",
                        str(args.warmup),
                    ],
                    capture_output=True,
                    text=True,
                )
                if out.returncode:  # the child's own one-line error (a bad --data), not a traceback of ours
                    lines = out.stderr.strip().splitlines() or [f"{kind} {arch} exited {out.returncode}"]
                    print(lines[-1], file=sys.stderr)
                    return 2
                record = json.loads(out.stdout.strip().splitlines()[-1])
                record.update(repeat=repeat, load_before=load)
                runs.append(record)
                if args.json:
                    print(json.dumps(record), flush=True)
    if not args.json:
        print(f"{args.data}, batch 128, CPU, load {os.getloadavg()[0]:.1f} at the end; medians of {args.repeats} runs")
        print(
            "| arch | search images/s | dense images/s | search/dense step time | data path share of a "
            "search step | peak RSS search / dense MB |"
        )
        print("|---|---:|---:|---:|---:|---:|")
        for arch in dict.fromkeys(r["arch"] for r in runs):
            s = [r for r in runs if r["arch"] == arch and r["kind"] == "search"]
            d = [r for r in runs if r["arch"] == arch and r["kind"] == "dense"]
            ratios = [a["step_s"] / b["step_s"] for a, b in zip(s, d)]
            med = statistics.median
            print(
                f"| {arch} | {med(r['images_per_s'] for r in s):,.0f} | {med(r['images_per_s'] for r in d):,.0f} | "
                f"{med(ratios):.2f} | {100 * med(r['data_share'] for r in s):.1f} % | "
                f"{max(r['peak_rss_mb'] for r in s):,.0f} / {max(r['peak_rss_mb'] for r in d):,.0f} |"
            )
    return 0


if __name__ == "__main__":
    from maskforge.errors import MaskforgeError

    try:
        raise SystemExit(main())
    except MaskforgeError as exc:  # a bad --data, a missing data set: one line, as the CLI does
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None

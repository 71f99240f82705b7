#!/usr/bin/env python
"""`maskforge archs`: counting weights by arithmetic against building every network, and the command's start.

In one process, interleaved and repeated (`--repeats`):

* `built`  — what `list_archs` did before: every architecture built on the meta device at the CIFAR-10 and
             the ImageNet shape (torchvision imported), its masked weights summed;
* `counted` — what it does now: `archs.count_masked_weights` (arithmetic, nothing built).

Both give the same numbers (checked here, and by tests/test_archs.py). Then, in fresh processes
(`--starts` of each, interleaved): `python -c "import torch"`, `python -c "import maskforge.archs"` (the
builders: what `maskforge archs` imported before the torch-free registry), `maskforge archs`, and
`maskforge --help`. Wall clock and CPU time (user + system of the child).

    python benchmarks/archs_listing.py                # a table
    python benchmarks/archs_listing.py --json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time

import torch

from maskforge import archs
from maskforge.layers import masked_modules

SHAPES = [(3, 10, (32, 32)), (3, 1000, (224, 224))]


def built_counts() -> list[int]:
    counts = []
    for name in archs.arch_names():
        for channels, classes, size in SHAPES:
            with torch.device("meta"):
                model = archs.build_structure(name, archs.arch_args(channels, classes, size), 0.5)
            counts.append(sum(layer.weight.numel() for layer in masked_modules(model).values()))
    return counts


def counted_counts() -> list[int]:
    return [
        archs.count_masked_weights(name, archs.arch_args(channels, classes, size))
        for name in archs.arch_names()
        for channels, classes, size in SHAPES
    ]


def child_times(command: list[str]) -> tuple[float, float]:
    """(wall s, CPU s) of one fresh process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--starts", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    assert built_counts() == counted_counts(), "arithmetic and built counts differ"
    ratios, built_s, counted_s = [], [], []
    for _ in range(args.repeats):
        started = time.perf_counter()
        built_counts()
        built = time.perf_counter() - started
        started = time.perf_counter()
        counted_counts()
        counted = time.perf_counter() - started
        built_s.append(built)
        counted_s.append(counted)
        ratios.append(built / counted)
    executable = shutil.which("maskforge") or "maskforge"
    commands = {
        "import torch": [sys.executable, "-c", "import torch"],
        "import maskforge.archs": [sys.executable, "-c", "import maskforge.archs"],
        "maskforge archs": [executable, "archs"],
        "maskforge --help": [executable, "--help"],
    }
    starts: dict[str, list[tuple[float, float]]] = {name: [] for name in commands}
    for _ in range(args.starts):
        for name, command in commands.items():
            starts[name].append(child_times(command))
    record = {
        "built_ms": 1000 * statistics.median(built_s),
        "counted_ms": 1000 * statistics.median(counted_s),
        "median_ratio_built_over_counted": statistics.median(ratios),
        **{f"{name} wall_s": statistics.median(w for w, _ in runs) for name, runs in starts.items()},
        **{f"{name} cpu_s": statistics.median(c for _, c in runs) for name, runs in starts.items()},
        "load_avg": os.getloadavg()[0],
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
    }
    if args.json:
        print(json.dumps(record))
        return 0
    print(
        f"list_archs counts: built on meta {record['built_ms']:.0f} ms, counted {record['counted_ms']:.2f} ms, "
        f"median ratio {record['median_ratio_built_over_counted']:.0f}x"
    )
    for name in commands:
        print(
            f"{name:24s} wall {record[name + ' wall_s']:.2f} s  cpu {record[name + ' cpu_s']:.2f} s (medians of "
            f"{args.starts})"
        )
    print(f"load average {record['load_avg']:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

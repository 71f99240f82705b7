#!/usr/bin/env python
"""Regenerating a network's weights from its seed, with verification, against loading them from disk.

For one architecture (default `wrn50`, 68.8 M masked weights) this times, interleaved and repeated:

* `regen`  — what materialize does: every masked layer's weights from `regen.generate` plus the SHA-256
             of each tensor (`regen.weight_digest`), one layer per task in a thread pool;
* `regen_nohash` — the same without the digests (the generator alone; `archs.regenerate_weights`);
* `load`   — `torch.load(..., weights_only=True)` of the same float32 weights saved with `torch.save` to a
             temporary file (read back from the page cache after the first round, which favours `load`).

The default distribution is signed Kaiming constant; `--init kaiming_normal` (slower by design: an inverse
normal CDF built from + - * / only) is reported separately with `--also-normal`.

    python benchmarks/regen_speed.py                         # wrn50, signed constant, a table
    python benchmarks/regen_speed.py --also-normal --json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from maskforge import archs, regen
from maskforge.layers import masked_modules

SHAPES = {
    "wrn50": (3, 1000, (224, 224)),
    "resnet50": (3, 1000, (224, 224)),
    "resnet18": (3, 10, (32, 32)),
    "conv4": (3, 10, (32, 32)),
    "fc": (1, 10, (28, 28)),
}


def layer_shapes(arch: str) -> dict[str, tuple[int, ...]]:
    channels, classes, size = SHAPES[arch]
    with torch.device("meta"):
        model = archs.build_structure(arch, archs.arch_args(channels, classes, size), 0.5)
    return {f"{name}.weight": tuple(layer.weight.shape) for name, layer in masked_modules(model).items()}


def regenerate(shapes: dict, init: str, threads: int, verify: bool) -> dict:
    """What materialize does: every layer regenerated (and with `verify` hashed) in a thread pool."""
    return regen.generate_many(0, shapes, init, k=0.5, digests=verify, threads=threads)


def save_dense(shapes: dict, init: str, path: Path, threads: int) -> None:
    weights = regen.generate_many(0, shapes, init, k=0.5, threads=threads)
    torch.save({name: torch.from_numpy(weight) for name, (weight, _) in weights.items()}, path)


def load_dense(path: Path) -> dict:
    return torch.load(path, weights_only=True, map_location="cpu")


def bench(arch: str, init: str, repeats: int, threads: int) -> dict:
    shapes = layer_shapes(arch)
    weights = sum(int(np.prod(s)) for s in shapes.values())
    with tempfile.TemporaryDirectory(prefix="maskforge-regen-") as tmp:
        path = Path(tmp) / "weights.pt"
        save_dense(shapes, init, path, threads)
        file_mb = path.stat().st_size / 2**20
        variants = {
            "regen": lambda: regenerate(shapes, init, threads, verify=True),
            "regen_nohash": lambda: regenerate(shapes, init, threads, verify=False),
            "load": lambda: load_dense(path),
        }
        for run in variants.values():  # warm-up: page cache, thread pool, allocator
            run()
        samples: dict[str, list[float]] = {name: [] for name in variants}
        cpu: dict[str, list[float]] = {name: [] for name in variants}
        names = list(variants)
        for r in range(repeats):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                started, cpu_started = time.perf_counter(), time.process_time()
                result = variants[name]()
                samples[name].append(time.perf_counter() - started)
                cpu[name].append(time.process_time() - cpu_started)
                del result
    med = {name: statistics.median(v) * 1e3 for name, v in samples.items()}
    cpu_med = {name: statistics.median(v) * 1e3 for name, v in cpu.items()}
    return {
        "arch": arch,
        "init": init,
        "weights": weights,
        "layers": len(shapes),
        "threads": threads,
        "regen_verify_ms": med["regen"],
        "regen_only_ms": med["regen_nohash"],
        "load_ms": med["load"],
        "ratio": med["regen"] / med["load"],
        "regen_only_ratio": med["regen_nohash"] / med["load"],
        "regen_verify_min_ms": min(samples["regen"]) * 1e3,
        "load_min_ms": min(samples["load"]) * 1e3,
        # CPU seconds of the whole process (all threads, kernel time included): the work, whatever the load
        "regen_verify_cpu_ms": cpu_med["regen"],
        "regen_only_cpu_ms": cpu_med["regen_nohash"],
        "load_cpu_ms": cpu_med["load"],
        "cpu_ratio": cpu_med["regen"] / cpu_med["load"],
        "regen_gweights_per_s": weights / (med["regen"] / 1e3) / 1e9,
        "dense_file_mb": file_mb,
        "repeats": repeats,
        "load_avg": os.getloadavg()[0],
        "cpus": os.cpu_count(),
        "machine": platform.processor() or platform.machine(),
        "numpy": np.__version__,
        "torch": torch.__version__,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="wrn50", choices=list(SHAPES))
    parser.add_argument("--init", default="signed_constant", choices=regen.DISTRIBUTIONS)
    parser.add_argument("--also-normal", action="store_true", help="also time kaiming_normal")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=regen.default_threads())
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    inits = [args.init] + (["kaiming_normal"] if args.also_normal and args.init != "kaiming_normal" else [])
    for init in inits:
        record = bench(args.arch, init, args.repeats, args.threads)
        if args.json:
            print(json.dumps(record), flush=True)
        else:
            print(
                f"{record['arch']} {record['init']}: {record['weights'] / 1e6:.1f} M weights, "
                f"{record['threads']} threads | regen+verify {record['regen_verify_ms']:.0f} ms "
                f"(regen only {record['regen_only_ms']:.0f} ms) | torch.load {record['load_ms']:.0f} ms of "
                f"{record['dense_file_mb']:.0f} MB | ratio regen+verify/load {record['ratio']:.2f} "
                f"| CPU time: regen+verify {record['regen_verify_cpu_ms']:.0f} ms, regen only "
                f"{record['regen_only_cpu_ms']:.0f} ms, load {record['load_cpu_ms']:.0f} ms "
                f"| load avg {record['load_avg']:.1f}",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())

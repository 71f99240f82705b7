#!/usr/bin/env python
"""int8 of a converted model: the whole graph quantized against its weight operators only, against fp32.

`export/int8.py` quantizes a graph whole (every operator onnxruntime has an integer kernel for) unless it
holds one of `FLOAT_OPS` (a transformer's softmax and norms), where it quantizes the weight operators only
and leaves the rest in float32. This script exports one artifact three ways, as dense ONNX files:

* `fp32`         the plain float graph;
* `int8 weights` the weight operators only, the first in float (`float_nodes` forced to find one);
* `int8 whole`   every operator (`float_nodes` forced to find none),

each through `export_onnx`, so each is checked (kernels, top-1 and agreement with fp32 on held-out
images) or the row says why it was refused. Then it times the three in onnxruntime, interleaved in one
process (one thread, a fixed random batch), and reports the median time and the median of the per-round
ratios fp32 time / this time.

    python benchmarks/int8_paths.py runs/efficientnet/artifact.safetensors
    python benchmarks/int8_paths.py ARTIFACT --batch 8 --rounds 30 --json

Set OMP_WAIT_POLICY=PASSIVE on a shared machine. Name the CPU with every figure: int8 speed depends on
VNNI (README, footnote on int8 speed).
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

from maskforge.artifact import load_artifact
from maskforge.errors import MaskforgeError
from maskforge.export import export_onnx, ort_session
from maskforge.export import int8 as int8_module


def export_three(artifact: Path, folder: Path) -> dict[str, dict]:
    """The three files, each with its export figures, or the reason it was refused."""
    saved = int8_module.float_nodes
    rows = {}
    for name, float_nodes, precision in (
        ("fp32", saved, "fp32"),
        ("int8 weights", lambda proto: ["(forced)"], "int8"),
        ("int8 whole", lambda proto: [], "int8"),
    ):
        int8_module.float_nodes = float_nodes  # what decides the path: any float-only node
        path = folder / (name.replace(" ", "_") + ".onnx")
        try:
            result = export_onnx(artifact, path, storage="dense", precision=precision)
            rows[name] = {
                "path": str(path),
                "file_bytes": result.file_bytes,
                "argmax_agreement": result.argmax_agreement,
                "top1": result.top1,
                "reference_top1": result.reference_top1,
                "kernel_max_steps": result.kernel_max_steps,
            }
        except MaskforgeError as exc:
            rows[name] = {"refused": str(exc)}
        finally:
            int8_module.float_nodes = saved
    return rows


def time_files(rows: dict[str, dict], images: np.ndarray, rounds: int) -> None:
    """Add `median_ms` and `speedup_vs_fp32` (median of per-round ratios) to each row with a file."""
    sessions = {name: ort_session(row["path"], threads=1) for name, row in rows.items() if "path" in row}
    input_name = next(iter(sessions.values())).get_inputs()[0].name
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for _ in range(3):  # warm-up
        for session in sessions.values():
            session.run(None, {input_name: images})
    for _ in range(rounds):
        for name, session in sessions.items():
            started = time.perf_counter()
            session.run(None, {input_name: images})
            times[name].append(time.perf_counter() - started)
    for name, seconds in times.items():
        rows[name]["median_ms"] = 1e3 * statistics.median(seconds)
        if "fp32" in times:
            rows[name]["speedup_vs_fp32"] = statistics.median(f / t for f, t in zip(times["fp32"], seconds))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("artifact", type=Path)
    parser.add_argument("--batch", type=int, default=8, help="images per timed run (default 8)")
    parser.add_argument("--rounds", type=int, default=20, help="interleaved timed rounds (default 20)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    try:
        artifact = load_artifact(args.artifact)
    except MaskforgeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    spec = artifact.spec
    images = np.random.default_rng(0).standard_normal((args.batch, spec.channels, spec.height, spec.width))
    with tempfile.TemporaryDirectory(prefix="maskforge-int8-paths-") as tmp:
        rows = export_three(args.artifact, Path(tmp))
        time_files(rows, images.astype(np.float32), args.rounds)
    report = {
        "artifact": str(args.artifact),
        "arch": artifact.meta.arch.name if artifact.meta else None,
        "cpu": platform.processor() or platform.machine(),
        "batch": args.batch,
        "rounds": args.rounds,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "rows": {name: {k: v for k, v in row.items() if k != "path"} for name, row in rows.items()},
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"{report['arch']}: batch {args.batch}, {args.rounds} interleaved rounds, 1 thread")
    for name, row in report["rows"].items():
        if "refused" in row:
            print(f"  {name:13s} refused: {row['refused']}")
            continue
        agreement = "" if row["argmax_agreement"] is None else f", agreement {100 * row['argmax_agreement']:.1f} %"
        print(
            f"  {name:13s} {row['median_ms']:8.2f} ms  x{row['speedup_vs_fp32']:.2f} vs fp32  "
            f"{row['file_bytes']:,} bytes{agreement}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

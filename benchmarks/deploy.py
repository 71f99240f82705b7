#!/usr/bin/env python
"""Every export mode side by side, in one run: size, session start, memory, speed and accuracy.

For each workload, `maskforge.evaluation.compare` (what `maskforge eval ARTIFACT --compare` runs) exports
the six ONNX modes (storage dense|compact|regen x precision fp32|int8; each file checked by the export
itself) and measures them in onnxruntime on the CPU, the modes taking turns so that every mode sees the
same machine load:

* bits per masked weight (file size x 8 / masked weights) and the artifact's, for reference;
* session start: InferenceSession creation (default options, the thread count), --starts per mode, the
  modes taking turns in one fresh process; median, and the median of per-round ratios to compact fp32;
* peak memory: the high-water mark of a fresh process that opens the file and runs one batch of 1 and
  one of 64 (`peak_rss_mb`), and that minus the same process's mark before the session (`model_rss_mb`);
* latency (p50/p90/p99) and throughput (batch / p50) at batch 1 and 64: --runs calls per mode and batch
  size in --rounds alternating blocks; the speedup over dense fp32 is the median of the per-round ratios
  (so a load change hits both sides of each ratio alike);
* held-out top-1 of each file, argmax agreement with the float32 network and the top-1 difference.

Workloads: `conv4` (k 0.5) and `resnet18` (k 0.3) on the built-in demo data (1x28x28), and
`resnet18-px` (k 0.3) at --size pixels (default 96, torchvision's ImageNet stem) on a synthetic image
folder this script writes (four texture classes). An artifact is searched for each workload unless
given with --artifact NAME=PATH; searches are kept in --workdir and reused.

    python benchmarks/deploy.py                                   # all workloads, a table
    python benchmarks/deploy.py --json                            # one JSON line per workload and mode
    python benchmarks/deploy.py --workload conv4 --artifact conv4=runs/conv4/artifact.safetensors

Timings on a shared machine are noisy: the JSON carries the load average; rerun on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

WORKLOADS = {
    # name: (arch, k, search epochs, search batch size, data: "mnist5k" or "synthetic")
    "conv4": ("conv4", 0.5, 3, 128, "mnist5k"),
    "resnet18": ("resnet18", 0.3, 5, 128, "mnist5k"),
    "resnet18-px": ("resnet18", 0.3, 15, 64, "synthetic"),
}


# --- artifacts and data ----------------------------------------------------------------------------------


def write_synthetic_folder(root: Path, size: int, train_per_class: int = 150, val_per_class: int = 50) -> Path:
    """Four texture classes (horizontal / vertical stripes, checkerboard, disc) with random period,
    phase, colours and noise, as RGB PNGs in train/ and val/ class folders."""
    from PIL import Image

    if (root / "val").is_dir():
        return root
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    for split, count in (("train", train_per_class), ("val", val_per_class)):
        for label, name in enumerate(("hstripes", "vstripes", "checker", "disc")):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                period, phase = rng.uniform(size / 12, size / 4), rng.uniform(0, 2 * np.pi)
                if label == 0:
                    pattern = np.sin(2 * np.pi * yy / period + phase) > 0
                elif label == 1:
                    pattern = np.sin(2 * np.pi * xx / period + phase) > 0
                elif label == 2:
                    pattern = (np.sin(2 * np.pi * yy / period + phase) > 0) ^ (np.sin(2 * np.pi * xx / period) > 0)
                else:
                    cy, cx = rng.uniform(size / 3, 2 * size / 3, 2)
                    pattern = (yy - cy) ** 2 + (xx - cx) ** 2 < rng.uniform(size / 6, size / 3) ** 2
                colors = rng.uniform(0, 255, (2, 3))
                pixels = np.where(pattern[..., None], colors[0], colors[1]) + rng.normal(0, 25, (size, size, 3))
                Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(folder / f"{i}.png")
    return root


def searched_artifact(name: str, workdir: Path, size: int, given: dict[str, Path]) -> tuple[Path, str | None]:
    """The workload's artifact (given, found in workdir from an earlier run, or searched now) and the data
    to evaluate it on (None: the data its provenance names)."""
    if name in given:
        return given[name], None
    arch, k, epochs, batch_size, data = WORKLOADS[name]
    out = workdir / (f"search-{name}" + (f"-{size}" if data == "synthetic" else ""))
    path = out / "artifact.safetensors"
    source = "mnist5k" if data == "mnist5k" else str(workdir / f"synthetic{size}")
    if data == "synthetic":
        write_synthetic_folder(Path(source), size)
    if not path.exists():
        command = [
            sys.executable,
            "-m",
            "maskforge.cli",
            "search",
            "--arch",
            arch,
            "--k",
            str(k),
            "--epochs",
            str(epochs),
            "--batch-size",
            str(batch_size),
            "--data",
            source,
            "--out",
            str(out),
            "--quiet",
        ]
        if data == "synthetic":
            command += ["--image-size", str(size)]
        print(f"[deploy] searching {name}: {' '.join(command[2:])}", file=sys.stderr, flush=True)
        subprocess.run(command, check=True)
    return path, source


# --- measuring -------------------------------------------------------------------------------------------


def measure(name: str, artifact_path: Path, data: str | None, args) -> list[dict]:
    """One JSON row per export mode of the workload's artifact (refused modes: a row saying why)."""
    from maskforge import load_artifact
    from maskforge.sizes import bits_per_weight
    from maskforge.evaluation import LatencyOptions, compare, median_ratio

    artifact = load_artifact(artifact_path)

    def progress(stage: str, done: int, total: int) -> None:
        if stage != "scoring":
            print(f"[deploy] {name}: {stage} {done + 1}/{total}", file=sys.stderr, flush=True)

    table = compare(
        artifact_path,
        data=data,
        batch_size=64,
        threads=args.threads,
        latency=LatencyOptions(runs=args.runs, rounds=args.rounds, budget_s=args.budget),
        memory=args.memory,
        session_starts=args.starts,
        progress=progress,
    )
    compact = next((row.report.timing for row in table.rows if row.mode == "compact fp32"), None)
    common = {
        "workload": name,
        "arch": artifact.arch,
        "k": artifact.k,
        "input": f"{artifact.spec.channels}x{artifact.spec.height}x{artifact.spec.width}",
        "artifact_bytes": artifact.file_bytes,
        "artifact_bits_per_weight": bits_per_weight(artifact.file_bytes, artifact.masked_weights),
        "threads": args.threads,
        "load_avg": os.getloadavg()[0],
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "date": time.strftime("%Y-%m-%d"),
    }
    rows = []
    for row in table.rows:
        summary, timing = row.summary(), row.report.timing
        record = {
            **common,
            **summary,
            "file_bytes": summary["onnx_bytes"],
            "heldout_examples": row.report.accuracy.examples,
            "export_max_abs_diff": row.export.max_abs_diff,
            "session_start_vs_compact_fp32": median_ratio(timing.session_start_runs_ms, compact.session_start_runs_ms)
            if timing is not None and compact is not None
            else None,
        }
        if summary["peak_rss_bytes"] is not None:
            record["peak_rss_mb"] = summary["peak_rss_bytes"] / 2**20
            record["model_rss_mb"] = summary["model_rss_bytes"] / 2**20
        rows.append(record)
    for mode, why in table.refused.items():
        storage, precision = mode.split()[:2]
        rows.append({**common, "mode": mode, "storage": storage, "precision": precision, "refused": why})
    return rows


# --- output ----------------------------------------------------------------------------------------------


def print_table(rows: list[dict]) -> None:
    header = (
        f"{'workload':12s} {'storage':8s} {'prec':5s} {'bits/w':>7s} {'start ms':>9s} {'img/s b1':>9s} "
        f"{'x b1':>6s} {'img/s b64':>10s} {'x b64':>6s} {'top-1':>7s} {'agree':>7s} {'RSS MB':>7s}"
    )
    print(header)
    for r in rows:
        if "refused" in r:
            print(f"{r['workload']:12s} {r['storage']:8s} {r['precision']:5s} refused: {r['refused']}")
            continue
        print(
            f"{r['workload']:12s} {r['storage']:8s} {r['precision']:5s} {r['bits_per_weight']:7.3f} "
            f"{_value(r['session_start_ms'], 9, '.1f')} {_value(r['throughput_b1'], 9, '.1f')} "
            f"{_value(r['speedup_b1'], 5, '.2f')}x {_value(r['throughput_b64'], 10, '.1f')} "
            f"{_value(r['speedup_b64'], 5, '.2f')}x {100 * r['top1']:6.2f}% {100 * r['argmax_agreement']:6.2f}% "
            f"{_value(r.get('peak_rss_mb'), 7, '.0f')}"
        )
    if rows:
        print(
            f"threads {rows[0]['threads']}, load average {rows[-1]['load_avg']:.1f} on {os.cpu_count()} CPUs; "
            f"x = speedup over dense fp32 (median of per-round ratios)"
        )


def _value(value: float | None, width: int, spec: str) -> str:
    return format("n/a" if value is None else format(value, spec), f">{width}s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workload", action="append", choices=sorted(WORKLOADS), help="default: all")
    parser.add_argument(
        "--artifact",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="use this artifact for workload NAME instead of searching one",
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        default=Path("runs/deploy-bench"),
        help="searches, the synthetic folder and the exports (reused between runs)",
    )
    parser.add_argument("--size", type=int, default=96, help="image side of the resnet18-px workload (>= 64)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=7, help="alternating timing rounds per batch size")
    parser.add_argument("--runs", type=int, default=140, help="timed calls per mode and batch size")
    parser.add_argument(
        "--budget",
        type=float,
        default=90.0,
        help="seconds per batch size (all modes), at most roughly: a block stops early after 3 "
        "calls once it has used its share",
    )
    parser.add_argument("--starts", type=int, default=9, help="session creations per mode")
    parser.add_argument("--no-memory", dest="memory", action="store_false", help="skip the peak-memory probes")
    parser.add_argument("--json", action="store_true", help="one JSON line per workload and mode")
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    given = {}
    for entry in args.artifact:
        name, _, path = entry.partition("=")
        if name not in WORKLOADS or not path:
            parser.error(f"--artifact takes NAME=PATH with NAME one of {', '.join(WORKLOADS)}; got {entry!r}")
        given[name] = Path(path)
    args.workdir.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    for name in args.workload or list(WORKLOADS):
        path, data = searched_artifact(name, args.workdir, args.size, given)
        measured = measure(name, path, data, args)
        if args.json:  # each workload's lines as soon as they are measured
            print("\n".join(json.dumps(row) for row in measured), flush=True)
        rows += measured
    if not args.json:
        print_table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())

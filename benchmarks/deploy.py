#!/usr/bin/env python
"""Every export mode side by side, in one run: size, session start, memory, speed and accuracy.

For each workload the six ONNX modes (storage dense|compact|regen x precision fp32|int8) are exported
with `maskforge.export_onnx` (each file checked by the export itself), then measured in onnxruntime on
the CPU, interleaved so that every mode sees the same machine load:

* bits per masked weight (file size x 8 / masked weights) and the artifact's, for reference;
* session start: InferenceSession creation (default options, the thread count), median of --starts;
* peak memory: ru_maxrss of a fresh process that opens the file and runs one batch of 64;
* latency and throughput at batch 1 and 64: --rounds rounds, each running every mode for a block of
  calls after a short pause; throughput = batch / p50; the speedup over dense fp32 is the median of
  the per-round ratios (so a load change hits both sides of each ratio alike);
* held-out top-1 of each file, and argmax agreement with dense fp32 on the same images.

Workloads: `conv4` (k 0.5) and `resnet18` (k 0.3) on the built-in demo data (1x28x28), and
`resnet18-px` (k 0.3) at --size pixels (default 96, torchvision's ImageNet stem) on a synthetic image
folder this script writes (four texture classes). An artifact is searched for each workload unless
given with --artifact NAME=PATH; searches and exports are kept in --workdir and reused.

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

MODES = [(storage, precision) for precision in ("fp32", "int8") for storage in ("dense", "compact", "regen")]
BASELINE = ("dense", "fp32")
WORKLOADS = {
    # name: (arch, k, search epochs, search batch size, data: "mnist5k" or "synthetic")
    "conv4": ("conv4", 0.5, 3, 128, "mnist5k"),
    "resnet18": ("resnet18", 0.3, 5, 128, "mnist5k"),
    "resnet18-px": ("resnet18", 0.3, 15, 64, "synthetic"),
}
SETTLE_S = 0.1   # pause before each timing block: the previous session's worker threads stop spinning


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


def searched_artifact(name: str, workdir: Path, size: int, given: dict[str, Path]) -> Path:
    """The workload's artifact: given, found in workdir from an earlier run, or searched now."""
    if name in given:
        return given[name]
    arch, k, epochs, batch_size, data = WORKLOADS[name]
    out = workdir / (f"search-{name}" + (f"-{size}" if data == "synthetic" else ""))
    path = out / "artifact.safetensors"
    if not path.exists():
        source = "mnist5k" if data == "mnist5k" else str(write_synthetic_folder(workdir / f"synthetic{size}", size))
        command = [sys.executable, "-m", "maskforge.cli", "search", "--arch", arch, "--k", str(k), "--epochs",
                   str(epochs), "--batch-size", str(batch_size), "--data", source, "--out", str(out), "--quiet"]
        if data == "synthetic":
            command += ["--image-size", str(size)]
        print(f"[deploy] searching {name}: {' '.join(command[2:])}", file=sys.stderr, flush=True)
        subprocess.run(command, check=True)
    return path


# --- measuring -------------------------------------------------------------------------------------------

def open_session(path: Path, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def session_starts(paths: dict, threads: int, starts: int) -> dict:
    """Median session-creation time per mode, modes interleaved; also each mode's ratio to compact fp32."""
    times = {mode: [] for mode in paths}
    for _ in range(starts):
        for mode, path in paths.items():
            time.sleep(SETTLE_S)
            started = time.perf_counter()
            open_session(path, threads)
            times[mode].append(time.perf_counter() - started)
    compact = np.array(times[("compact", "fp32")])
    return {mode: (1000 * float(np.median(values)), float(np.median(np.array(values) / compact)))
            for mode, values in times.items()}


def timed_blocks(sessions: dict, x: np.ndarray, rounds: int, calls: int) -> dict:
    """Per mode: every call's seconds and, per round, the block's median (modes interleaved)."""
    calls_s = {mode: [] for mode in sessions}
    blocks = {mode: [] for mode in sessions}
    for round_index in range(rounds):
        order = list(sessions)
        order = order[round_index % len(order):] + order[:round_index % len(order)]   # rotate the order
        for mode in order:
            session = sessions[mode]
            time.sleep(SETTLE_S)
            session.run(None, {"input": x})                                          # warm-up
            block = []
            for _ in range(calls):
                started = time.perf_counter()
                session.run(None, {"input": x})
                block.append(time.perf_counter() - started)
            calls_s[mode] += block
            blocks[mode].append(float(np.median(block)))
    return {"calls": calls_s, "blocks": blocks}


def accuracy(sessions: dict, images: np.ndarray, labels: np.ndarray) -> dict:
    predictions = {}
    for mode, session in sessions.items():
        logits = np.concatenate([session.run(None, {"input": images[i:i + 256]})[0]
                                 for i in range(0, len(images), 256)])
        predictions[mode] = logits.argmax(1)
    base = predictions[BASELINE]
    return {mode: (float((p == labels).mean()), float((p == base).mean())) for mode, p in predictions.items()}


_MEMORY_PROBE = """
import resource, sys, numpy as np, onnxruntime as ort
o = ort.SessionOptions(); o.intra_op_num_threads = int(sys.argv[2]); o.log_severity_level = 3
if sys.argv[1] != "-":
    s = ort.InferenceSession(sys.argv[1], o, providers=["CPUExecutionProvider"])
    i = s.get_inputs()[0]
    s.run(None, {i.name: np.zeros([64] + list(i.shape[1:]), np.float32)})
try:   # VmHWM: this process's own peak (ru_maxrss can carry the parent's peak across fork + exec)
    print(next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")))
except OSError:
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def peak_rss_mb(path: Path | None, threads: int) -> float:
    """Peak resident memory (MiB) of a fresh Python that opens `path` and runs a batch of 64 (None:
    the imports only)."""
    out = subprocess.run([sys.executable, "-c", _MEMORY_PROBE, str(path) if path else "-", str(threads)],
                         capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1]) / 1024


def measure(name: str, artifact_path: Path, workdir: Path, args) -> list[dict]:
    from maskforge import export_onnx, load_artifact, materialize
    from maskforge.export.calibration import matching_splits
    from maskforge.data import normalize
    import torch

    artifact = load_artifact(artifact_path)
    model = materialize(artifact)
    folder = workdir / f"exports-{name}"
    folder.mkdir(parents=True, exist_ok=True)
    results = {}
    for storage, precision in MODES:
        results[(storage, precision)] = export_onnx(artifact, folder / f"{storage}.{precision}.onnx", storage=storage,
                                                    precision=precision, model=model)
        print(f"[deploy] {name}: exported {storage} {precision} in {results[(storage, precision)].seconds:.1f} s",
              file=sys.stderr, flush=True)
    paths = {mode: result.path for mode, result in results.items()}
    splits = matching_splits(artifact.spec, artifact.document["provenance"]["data"])
    held = [splits.heldout[i] for i in range(len(splits.heldout))]
    images = normalize(torch.stack([image for image, _ in held]), artifact.spec).numpy()
    labels = np.array([int(label) for _, label in held])
    starts = session_starts(paths, args.threads, args.starts)
    sessions = {mode: open_session(path, args.threads) for mode, path in paths.items()}
    top1 = accuracy(sessions, images, labels)
    timings = {batch: timed_blocks(sessions, np.ascontiguousarray(images[np.arange(batch) % len(images)]),
                                   args.rounds, args.calls_b1 if batch == 1 else args.calls_b64)
               for batch in (1, 64)}
    baseline_rss = peak_rss_mb(None, args.threads) if args.memory else None
    rows = []
    for mode, result in results.items():
        row = {"workload": name, "arch": artifact.arch, "k": artifact.k,
               "input": f"{artifact.spec.channels}x{artifact.spec.height}x{artifact.spec.width}",
               "storage": mode[0], "precision": mode[1], "file_bytes": result.file_bytes,
               "bits_per_weight": result.bits_per_weight, "artifact_bytes": artifact.file_bytes,
               "artifact_bits_per_weight": 8 * artifact.file_bytes / artifact.masked_weights,
               "session_start_ms": starts[mode][0], "session_start_vs_compact_fp32": starts[mode][1],
               "top1": top1[mode][0], "argmax_agreement": top1[mode][1], "heldout_examples": len(labels),
               "export_s": result.seconds, "export_max_abs_diff": result.max_abs_diff,
               "int8_weight_max_error": result.int8_weight_max_error}
        for batch, timing in timings.items():
            calls = np.array(timing["calls"][mode])
            blocks, base = np.array(timing["blocks"][mode]), np.array(timing["blocks"][BASELINE])
            row[f"latency_b{batch}_ms"] = {"p50": 1000 * float(np.median(calls)),
                                           "p90": 1000 * float(np.percentile(calls, 90)),
                                           "p99": 1000 * float(np.percentile(calls, 99)), "calls": len(calls)}
            row[f"throughput_b{batch}"] = batch / float(np.median(calls))
            row[f"speedup_b{batch}"] = float(np.median(base / blocks))
        if args.memory:
            row["peak_rss_mb"] = peak_rss_mb(result.path, args.threads)
            row["peak_rss_over_baseline_mb"] = row["peak_rss_mb"] - baseline_rss
        row.update(threads=args.threads, load_avg=os.getloadavg()[0], machine=platform.machine(),
                   cpus=os.cpu_count(), date=time.strftime("%Y-%m-%d"))
        rows.append(row)
    return rows


# --- output ----------------------------------------------------------------------------------------------

def print_table(rows: list[dict]) -> None:
    header = (f"{'workload':12s} {'storage':8s} {'prec':5s} {'bits/w':>7s} {'start ms':>9s} {'img/s b1':>9s} "
              f"{'x b1':>6s} {'img/s b64':>10s} {'x b64':>6s} {'top-1':>7s} {'agree':>7s} {'RSS MB':>7s}")
    print(header)
    for r in rows:
        print(f"{r['workload']:12s} {r['storage']:8s} {r['precision']:5s} {r['bits_per_weight']:7.3f} "
              f"{r['session_start_ms']:9.1f} {r['throughput_b1']:9.1f} {r['speedup_b1']:5.2f}x "
              f"{r['throughput_b64']:10.1f} {r['speedup_b64']:5.2f}x {100 * r['top1']:6.2f}% "
              f"{100 * r['argmax_agreement']:6.2f}% {r.get('peak_rss_mb', float('nan')):7.0f}")
    if rows:
        print(f"threads {rows[0]['threads']}, load average {rows[-1]['load_avg']:.1f} on {os.cpu_count()} CPUs; "
              f"x = speedup over dense fp32 (median of per-round ratios)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workload", action="append", choices=sorted(WORKLOADS), help="default: all")
    parser.add_argument("--artifact", action="append", default=[], metavar="NAME=PATH",
                        help="use this artifact for workload NAME instead of searching one")
    parser.add_argument("--workdir", type=Path, default=Path("runs/deploy-bench"),
                        help="searches, the synthetic folder and the exports (reused between runs)")
    parser.add_argument("--size", type=int, default=96, help="image side of the resnet18-px workload (>= 64)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=7, help="interleaved timing rounds per batch size")
    parser.add_argument("--calls-b1", type=int, default=20, help="calls per block at batch 1")
    parser.add_argument("--calls-b64", type=int, default=3, help="calls per block at batch 64")
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
    rows = []
    for name in args.workload or list(WORKLOADS):
        path = searched_artifact(name, args.workdir, args.size, given)
        for row in measure(name, path, args.workdir, args):
            rows.append(row)
            if args.json:
                print(json.dumps(row), flush=True)
    if not args.json:
        print_table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""onnxruntime vs PyTorch eager on the CPU, for the same materialized network, measured in one run.

For each workload: materialize an artifact (given with --artifact, or a seeded one built here), export it
compact (checked against PyTorch by `export_onnx`), open it in onnxruntime with default session options
(plus the thread count), and time both runtimes on the same input batches at batch 1 and batch B. Timing
uses `maskforge.evaluation.time_calls`, what `maskforge eval` uses: warm-up calls, then alternating blocks
of calls per runtime with a short pause before each block, so that neither runtime's spinning worker
threads steal the cores from the other and a varying background load hits both alike. The figures are
medians (p50) per call; images/s = batch / p50; the ratio is onnxruntime's images/s over PyTorch's.

    python benchmarks/ort_vs_torch.py                      # conv4 (1x28x28) and resnet18 (3x32x32), a table
    python benchmarks/ort_vs_torch.py --json --threads 1
    python benchmarks/ort_vs_torch.py --artifact runs/conv4/artifact.safetensors --batch-size 128

Timings on a shared machine are noisy: read `load_avg` in the JSON and rerun on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from maskforge import archs
from maskforge.artifact import build_artifact, load_artifact, save_artifact
from maskforge.data import InputSpec
from maskforge.evaluation import latency_stats, time_calls
from maskforge.export import export_onnx, ort_session
from maskforge.materialization import materialize

WORKLOADS = {
    # name: (arch, channels, size, classes, k)
    "conv4": ("conv4", 1, 28, 10, 0.5),
    "resnet18": ("resnet18", 3, 32, 10, 0.5),
}


def seeded_artifact(name: str, folder: Path) -> Path:
    arch, channels, size, classes, k = WORKLOADS[name]
    model = archs.create_model(arch, in_channels=channels, num_classes=classes, image_size=(size, size), k=k)
    spec = InputSpec(channels, size, size, (0.5,) * channels, (0.25,) * channels, tuple(str(i) for i in range(classes)))
    artifact = build_artifact(
        model.eval(),
        arch=arch,
        arch_args=archs.arch_args(channels, classes, (size, size)),
        spec=spec,
        seed=0,
        init="signed_constant",
        scale_fan=False,
        k=k,
    )
    return save_artifact(artifact, folder / f"{name}.safetensors")


def measure(path: Path, folder: Path, label: str, batch_size: int, threads: int, runs: int, budget_s: float) -> dict:
    artifact = load_artifact(path)
    model = materialize(artifact)
    exported = export_onnx(artifact, folder / f"{label}.onnx", model=model)
    session = ort_session(exported.path, threads=threads)
    spec = artifact.spec
    gen = torch.Generator().manual_seed(0)
    full = torch.randn(batch_size, spec.channels, spec.height, spec.width, generator=gen)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    row = {
        "workload": label,
        "arch": artifact.arch,
        "input": f"{spec.channels}x{spec.height}x{spec.width}",
        "k": artifact.k,
        "threads": threads,
        "load_avg_before": os.getloadavg()[0],
    }
    try:
        for batch in sorted({1, batch_size}):
            x = full[:batch].contiguous()
            x_np = x.numpy()

            def eager(x=x):
                with torch.no_grad():
                    return model(x)

            times = time_calls(
                {"onnxruntime": lambda x_np=x_np: session.run(None, {"input": x_np}), "torch": eager},
                runs=runs,
                warmup=3,
                budget_s=budget_s,
            )
            p50 = {name: latency_stats(name, batch, blocks).p50_ms for name, blocks in times.items()}
            row[f"batch{batch}"] = {
                "ort_p50_ms": p50["onnxruntime"],
                "torch_p50_ms": p50["torch"],
                "ort_images_per_s": batch * 1000 / p50["onnxruntime"],
                "torch_images_per_s": batch * 1000 / p50["torch"],
                "ort_over_torch": p50["torch"] / p50["onnxruntime"],
                "runs": {name: sum(map(len, blocks)) for name, blocks in times.items()},
            }
    finally:
        torch.set_num_threads(previous)
    row["load_avg_after"] = os.getloadavg()[0]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workload", action="append", choices=sorted(WORKLOADS), help="default: all")
    parser.add_argument("--artifact", type=Path, action="append", default=[], help="time this artifact instead")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--runs", type=int, default=40, help="timed calls per runtime and batch size")
    parser.add_argument("--budget", type=float, default=20.0, help="seconds per batch size, at most (roughly)")
    parser.add_argument("--json", action="store_true", help="print JSON lines")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="maskforge-ort-") as tmp:
        folder = Path(tmp)
        jobs = [(path, path.stem) for path in args.artifact] or [
            (None, name) for name in (args.workload or list(WORKLOADS))
        ]
        for path, label in jobs:
            path = path or seeded_artifact(label, folder)
            row = measure(path, folder, label, args.batch_size, args.threads, args.runs, args.budget)
            row.update(
                machine=platform.machine(),
                cpus=os.cpu_count(),
                date=time.strftime("%Y-%m-%d"),
                torch=torch.__version__,
                onnxruntime=__import__("onnxruntime").__version__,
            )
            rows.append(row)
            if args.json:
                print(json.dumps(row), flush=True)
    if not args.json:
        print(f"{'workload':10s} {'batch':>5s} {'onnxruntime img/s':>18s} {'PyTorch img/s':>14s} {'ratio':>7s}")
        for r in rows:
            for key in sorted(k for k in r if k.startswith("batch")):
                b = r[key]
                print(
                    f"{r['workload']:10s} {key[5:]:>5s} {b['ort_images_per_s']:>18,.0f} "
                    f"{b['torch_images_per_s']:>14,.0f} {b['ort_over_torch']:>6.2f}x"
                )
        print(
            f"threads {rows[0]['threads']}, load average {rows[0]['load_avg_before']:.1f} -> "
            f"{rows[-1]['load_avg_after']:.1f} on {os.cpu_count()} CPUs"
            if rows
            else ""
        )


if __name__ == "__main__":
    main()

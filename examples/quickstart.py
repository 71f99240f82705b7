#!/usr/bin/env python
"""maskforge end to end through the Python API: search -> save -> export (compact + dense) -> eval.

Searches a subnetwork of a seeded random Conv-4 on the built-in demo data (5,000 MNIST digits), keeps
half the weights (k = 0.5), writes the artifact (seed + 1 bit per weight), exports it to ONNX twice and
evaluates the compact export in onnxruntime. About 2 minutes per epoch on 2 CPU cores.

    python examples/quickstart.py                 # conv4, 2 epochs, into runs/quickstart
    python examples/quickstart.py --arch fc --epochs 3 --out runs/fc
"""

from __future__ import annotations

import argparse
from pathlib import Path

import maskforge


def main() -> None:
    parser = argparse.ArgumentParser(description="search -> save -> export -> eval on the demo data")
    parser.add_argument("--arch", default="conv4", help="architecture (see `maskforge archs`)")
    parser.add_argument("--k", type=float, default=0.5, help="fraction of weights kept")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--out", default="runs/quickstart", help="run folder")
    args = parser.parse_args()

    # 1. search: only the scores train; the weights stay at their seeded random values
    result = maskforge.search(maskforge.SearchConfig(arch=args.arch, k=args.k, epochs=args.epochs, out=args.out),
                              progress=True)
    print(f"search: held-out accuracy {result.heldout_acc:.2%}; artifact {result.artifact_path} "
          f"({result.artifact.file_bytes:,} bytes)")

    # 2. save / load: `search` already saved it; loading validates every digest
    artifact = maskforge.load_artifact(result.artifact_path)

    # 3. materialize: a plain PyTorch network with the masked weights baked in
    model = maskforge.materialize(artifact)

    # 4. export: both files are checked in onnxruntime against `model` before they are kept
    out = Path(args.out)
    compact = maskforge.export_onnx(artifact, out / "model.onnx", compact=True, model=model)
    dense = maskforge.export_onnx(artifact, out / "model.dense.onnx", compact=False, model=model)
    for exported in (compact, dense):
        print(f"export: {exported.path} ({exported.layout}) {exported.file_bytes:,} bytes = "
              f"{exported.bits_per_weight:.2f} bits per weight; max |onnxruntime - PyTorch| "
              f"{exported.max_abs_diff:.1e}")

    # 5. eval: the artifact itself, so PyTorch eager runs beside onnxruntime on the same batches
    report = maskforge.evaluate(result.artifact_path, batch_size=64)
    acc, agree, timing = report.accuracy, report.agreement, report.timing
    print(f"eval: top-1 {acc.top1:.2%} ({acc.correct} / {acc.examples}), top-{acc.k} {acc.topk:.2%}; "
          f"PyTorch top-1 {agree.reference_top1:.2%}, argmax agreement {agree.argmax_agreement:.2%}; "
          f"search's last held-out accuracy {result.heldout_acc:.2%}")
    ort_b, torch_b = timing.at(report.batch_size), timing.at(report.batch_size, "pytorch")
    print(f"eval: onnxruntime batch {report.batch_size}: p50 {ort_b.p50_ms:.2f} ms, {ort_b.images_per_s:,.0f} "
          f"images/s = {ort_b.images_per_s / torch_b.images_per_s:.2f}x PyTorch eager; session start "
          f"{timing.session_start_ms:.1f} ms, peak memory {timing.peak_rss_bytes / 2**20:.0f} MiB")
    size, compute = report.size, report.compute
    print(f"eval: sizes: artifact {size.artifact_bytes:,} B, ONNX {size.onnx_bytes:,} B "
          f"({size.onnx_bits_per_weight:.2f} bits per weight), float32 weights {size.dense_float32_bytes:,} B")
    print(f"eval: {compute.params_kept:,} of {compute.params_total:,} weights kept; "
          f"{compute.macs_dense:,} MACs per image ({compute.macs_effective:,} effective)")
    print(compute.note)


if __name__ == "__main__":
    main()

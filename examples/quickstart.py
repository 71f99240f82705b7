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
    print(f"eval: top-1 {report['top1']:.2%} ({report['correct']} / {report['examples']}), "
          f"top-5 {report['top5']:.2%}; PyTorch top-1 {report['torch_top1']:.2%}; "
          f"search's last held-out accuracy {result.heldout_acc:.2%}")
    batch = str(report["batch_size"])
    print(f"eval: onnxruntime batch {batch}: p50 {report['latency_ms'][batch]['p50']:.2f} ms, "
          f"{report['images_per_s'][batch]:,.0f} images/s = {report['ort_vs_torch'][batch]:.2f}x PyTorch eager")
    print(f"eval: sizes: artifact {report['artifact_bytes']:,} B, ONNX compact {report['onnx_compact_bytes']:,} B, "
          f"ONNX dense {report['onnx_dense_bytes']:,} B, float32 weights {report['dense_float32_bytes']:,} B")
    print(f"eval: {report['params_kept']:,} of {report['params_total']:,} weights kept; "
          f"{report['macs_dense']:,} MACs per image ({report['macs_effective']:,} effective)")
    print(report["sparsity_note"])


if __name__ == "__main__":
    main()

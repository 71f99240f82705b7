#!/usr/bin/env python
"""maskforge end to end through the Python API: search -> save -> export (regen fp32 + int8) -> eval.

Searches a subnetwork of a seeded random Conv-4 on the built-in demo data (5,000 MNIST digits), keeps
half the weights (k = 0.5), writes the artifact (seed + 1 bit per weight), exports it to ONNX twice (the
default self-regenerating float32 file, and exact int8) and evaluates the int8 file in onnxruntime
against the float32 network. About a minute per epoch on 2 CPU cores.

    python examples/quickstart.py                 # conv4, 2 epochs, into a new runs/conv4-k0.5-s0[-N]
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
    parser.add_argument("--out", default=None, help="run folder (default: a new runs/<arch>-k<k>-s0[-N])")
    args = parser.parse_args()

    # 1. search: only the scores train; the weights stay at their seeded random values
    result = maskforge.search(maskforge.SearchConfig(arch=args.arch, k=args.k, epochs=args.epochs, out=args.out))
    print(
        f"search: held-out accuracy {result.heldout_acc:.2%}; artifact {result.artifact_path} "
        f"({result.artifact.file_bytes:,} bytes)"
    )

    # 2. save / load: `search` already saved it; loading validates every digest
    artifact = maskforge.load_artifact(result.artifact_path)

    # 3. materialize: a plain PyTorch network with the masked weights baked in
    model = maskforge.materialize(artifact)

    # 4. export: each file is checked in onnxruntime (float: against `model`; int8: against the same graph
    #    in float and against float32 top-1 on held-out images) before it is kept
    out = Path(result.artifact_path).parent
    regen = maskforge.export_onnx(artifact, out / "model.onnx", storage="regen", model=model)
    int8 = maskforge.export_onnx(artifact, out / "model.int8.onnx", storage="regen", precision="int8", model=model)
    for exported in (regen, int8):
        print(
            f"export: {exported.path} ({exported.storage} {exported.precision}) {exported.file_bytes:,} bytes = "
            f"{exported.bits_per_weight:.3f} bits per weight"
        )

    # 5. eval: the int8 file, with the artifact as the float32 reference run beside it on the same batches
    report = maskforge.evaluate(int8.path, reference=result.artifact_path, batch_size=64)
    acc, agree, timing = report.accuracy, report.agreement, report.timing
    print(
        f"eval: top-1 {acc.top1:.2%} ({acc.correct} / {acc.examples}), top-{acc.k} {acc.topk:.2%}; "
        f"float32 top-1 {agree.reference_top1:.2%}, argmax agreement {agree.argmax_agreement:.2%}; "
        f"search's last held-out accuracy {result.heldout_acc:.2%}"
    )
    for batch in (1, report.batch_size):
        latency = timing.at(batch)
        print(
            f"eval: int8 in onnxruntime, batch {batch}: p50 {latency.p50_ms:.2f} ms, "
            f"{latency.images_per_s:,.0f} images/s"
        )
    start = "n/a" if timing.session_start_ms is None else f"{timing.session_start_ms:.1f} ms"
    memory = "n/a" if timing.peak_rss_bytes is None else f"{timing.peak_rss_bytes / 2**20:.0f} MiB"
    print(f"eval: session start {start}, peak memory {memory}")  # n/a: the probe failed (its note says why)
    size, compute = report.size, report.compute
    print(
        f"eval: sizes: artifact {size.artifact_bytes:,} B, int8 ONNX {size.onnx_bytes:,} B "
        f"({size.onnx_bits_per_weight:.2f} bits per weight), float32 weights {size.dense_float32_bytes:,} B"
    )
    print(
        f"eval: {compute.params_kept:,} of {compute.params_total:,} weights kept; "
        f"{compute.macs_dense:,} MACs per image ({compute.macs_effective:,} effective)"
    )
    print(compute.note)


if __name__ == "__main__":
    main()

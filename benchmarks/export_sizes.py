#!/usr/bin/env python
"""ONNX sizes of the three fp32 storages (regen, compact, dense): bits per masked weight for conv4 and a
Wide ResNet-50 artifact. (All six modes, int8 included, with speed and accuracy: benchmarks/deploy.py.)

For each workload this builds an artifact (or reads the one given with --artifact), exports it regen,
compact and dense (each checked in onnxruntime against PyTorch by `export_onnx` itself), runs the files
in onnxruntime on the same batch to confirm they compute the same logits, and reports the file sizes:

* `conv4`  — the paper's Conv-4 on the demo data's shape (1x28x28, 10 classes), k = 0.5, signed constant.
* `wrn50`  — torchvision's Wide ResNet-50-2 at ImageNet shape (3x224x224, 1000 classes), k = 0.3: the
             artifact a `maskforge search --max-steps 1` would write (masks from the seeded initial scores,
             batch-norm statistics after one training-mode forward pass of a random batch), built without
             ImageNet. Needs about 4 GB of RAM and a few minutes on 2 cores.

    python benchmarks/export_sizes.py                       # both, a table
    python benchmarks/export_sizes.py --arch conv4 --json   # JSON lines
    python benchmarks/export_sizes.py --artifact runs/conv4/artifact.safetensors
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from maskforge import archs
from maskforge.artifact import build_artifact, load_artifact, save_artifact
from maskforge.data import InputSpec
from maskforge.export import export_onnx
from maskforge.materialization import materialize

WORKLOADS = {
    # arch: (channels, size, classes, k)
    "conv4": (1, 28, 10, 0.5),
    "wrn50": (3, 224, 1000, 0.3),
}


def synthetic_artifact(arch: str, folder: Path, seed: int = 0):
    """A --max-steps 1 style artifact: seeded weights and scores, BN statistics from one random batch."""
    channels, size, classes, k = WORKLOADS[arch]
    model = archs.create_model(arch, in_channels=channels, num_classes=classes, image_size=(size, size), k=k, seed=seed)
    if any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()):
        model.train()
        with torch.no_grad():  # what one search step does to the running statistics
            model(torch.randn(2, channels, size, size, generator=torch.Generator().manual_seed(seed)))
    spec = InputSpec(
        channels, size, size, (0.5,) * channels, (0.25,) * channels, tuple(f"class{i}" for i in range(classes))
    )
    artifact = build_artifact(
        model.eval(),
        arch=arch,
        arch_args=archs.arch_args(channels, classes, (size, size)),
        spec=spec,
        seed=seed,
        init="signed_constant",
        scale_fan=False,
        k=k,
        provenance={"data": "synthetic (benchmarks/export_sizes.py)", "steps": 1},
    )
    del model
    return save_artifact(artifact, folder / f"{arch}.safetensors")


def measure(artifact_path: Path, folder: Path, label: str) -> dict:
    artifact = load_artifact(artifact_path)
    started = time.perf_counter()
    model = materialize(artifact)
    materialize_s = time.perf_counter() - started
    results = {
        storage: export_onnx(artifact, folder / f"{label}.{storage}.onnx", storage=storage, model=model)
        for storage in ("regen", "compact", "dense")
    }
    spec = artifact.spec
    x = np.random.default_rng(1).standard_normal((2, spec.channels, spec.height, spec.width)).astype(np.float32)
    outputs, session_s = {}, {}
    for storage, result in results.items():
        t0 = time.perf_counter()
        session = ort.InferenceSession(str(result.path))  # default options
        session_s[storage] = time.perf_counter() - t0
        outputs[storage] = session.run(None, {"input": x})[0]
        del session
    masked = artifact.masked_weights
    row = {
        "workload": label,
        "arch": artifact.arch,
        "input": f"{spec.channels}x{spec.height}x{spec.width}",
        "classes": spec.num_classes,
        "k": artifact.k,
        "masked_weights": masked,
        "kept_weights": artifact.kept_weights,
        "artifact_bytes": artifact.file_bytes,
        "artifact_bits_per_weight": 8 * artifact.file_bytes / masked,
        "materialize_s": materialize_s,
        "ort_session_start_s": session_s,
        "dense_over_compact": results["dense"].file_bytes / results["compact"].file_bytes,
        "regen_over_artifact": results["regen"].file_bytes / artifact.file_bytes,
    }
    for storage, result in results.items():
        row[f"onnx_{storage}_bytes"] = result.file_bytes
        row[f"onnx_{storage}_bits_per_weight"] = result.bits_per_weight
        row[f"{storage}_vs_torch_max_abs_diff"] = result.max_abs_diff
        row[f"export_{storage}_s"] = result.seconds
        row[f"{storage}_vs_dense_max_abs_diff"] = float(np.abs(outputs[storage] - outputs["dense"]).max())
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", action="append", choices=sorted(WORKLOADS), help="workload(s) to run (default: all)")
    parser.add_argument(
        "--artifact",
        type=Path,
        action="append",
        default=[],
        help="measure this artifact instead of building a synthetic one",
    )
    parser.add_argument("--json", action="store_true", help="print JSON lines")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="maskforge-sizes-") as tmp:
        folder = Path(tmp)
        jobs = [(path, path.stem) for path in args.artifact]
        if not args.artifact:
            jobs = [(None, arch) for arch in (args.arch or list(WORKLOADS))]
        for path, label in jobs:
            path = path or synthetic_artifact(label, folder)
            row = measure(path, folder, label)
            row.update(
                machine=platform.processor() or platform.machine(),
                cpus=os.cpu_count(),
                load_avg=os.getloadavg()[0],
                date=time.strftime("%Y-%m-%d"),
            )
            rows.append(row)
            if args.json:
                print(json.dumps(row), flush=True)
            for file in folder.glob(f"{label}*"):
                file.unlink()
    if not args.json:
        print(
            f"{'workload':10s} {'weights':>12s} {'artifact':>14s} {'ONNX regen':>22s} {'ONNX compact':>22s} "
            f"{'ONNX dense':>22s}"
        )
        for r in rows:
            cells = " ".join(
                f"{r[f'onnx_{s}_bytes']:>12,d} ({r[f'onnx_{s}_bits_per_weight']:.3f} b/w)"
                for s in ("regen", "compact", "dense")
            )
            print(f"{r['workload']:10s} {r['masked_weights']:>12,d} {r['artifact_bytes']:>14,d} {cells}")
    sys.exit(0)


if __name__ == "__main__":
    main()

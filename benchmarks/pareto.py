#!/usr/bin/env python
"""maskforge against the pipeline a user would otherwise pick: accuracy against shipped bytes.

One architecture per run, on one data set (default Fashion-MNIST), with one epoch budget:

  (a) dense fp32        the same network with every weight trained (maskforge.dense: Adam, lr 1e-3, cosine,
                        the search's batches and label smoothing), exported to ONNX;
  (b) dense int8        (a) through onnxruntime's static quantization as a user would run it (QDQ,
                        per-channel int8 weights, uint8 activations, MinMax on 256 training images);
  (c) pruned + int8     (a) magnitude-pruned (torch.nn.utils.prune.global_unstructured, L1) to 50/70/90 %
                        sparsity, fine-tuned with the mask fixed (Adam lr 1e-4, cosine, --finetune-epochs),
                        then exported (fp32) and quantized as (b);
  (d) maskforge         edge-popup at k 0.1/0.3/0.5/0.7, per-layer and global top-k, exported with
                        `maskforge export` (default: regen fp32) and `--precision int8`.

For every file: held-out top-1 in onnxruntime (the whole held-out split), its bytes raw and after gzip -9
(a pruned file is shipped compressed: its zeros compress, maskforge's mask bits hardly do), bits per
weight of the dense network (8 x bytes / conv+linear weights), onnxruntime latency at batch 1 (p50) and
throughput at batch 64 (batch / p50), all files timed in alternating blocks so that every file sees the
same machine load, and the wall time it took to produce (training, fine-tuning, search, export;
a file built on (a) includes (a)'s training time).

    python benchmarks/pareto.py --arch fc                           # the default budget (10 epochs)
    python benchmarks/pareto.py --arch conv2 --epochs 2 --finetune-epochs 1
    python benchmarks/pareto.py --arch fc --quick                   # a few minutes: a check, not a result

Results: a markdown table on stdout, `--json FILE` (one JSON line per file, plus a machine line), and the
figure `--figure PATH` (PNG + SVG: top-1 against gzip bytes, log x). Trained networks, searches and
exports are kept in `--workdir` and reused when the script runs again with the same settings (timing and
accuracy are measured anew each time).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

KS = (0.1, 0.3, 0.5, 0.7)
SPARSITIES = (0.5, 0.7, 0.9)
OPSET = 17


@dataclass
class Row:
    family: str  # dense | dense-int8 | pruned | pruned-int8 | maskforge | maskforge-int8
    name: str
    path: str
    setting: str  # e.g. "sparsity 0.9", "k 0.3 layer"
    wall_s: float  # time to produce the file, training included
    top1: float = float("nan")
    bytes: int = 0
    gzip_bytes: int = 0
    bits_per_weight: float = float("nan")
    gzip_bits_per_weight: float = float("nan")
    latency_b1_ms: float = float("nan")
    throughput_b64: float = float("nan")


# --- producing the files ---------------------------------------------------------------------------------


def _cached(workdir: Path, name: str, make) -> dict:
    """`make()` (returning a JSON-able dict) once per workdir; a later run reads what it recorded."""
    record = workdir / "made" / f"{name}.json"
    if record.is_file():
        return json.loads(record.read_text())
    made = make()
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps(made))
    return made


def _save_onnx(model, spec, path: Path) -> None:
    from maskforge.export.onnxio import finalize
    from maskforge.export.trace import trace_to_onnx

    proto = trace_to_onnx(model.eval(), spec, OPSET)
    finalize(proto)  # IR version onnxruntime accepts, checked
    path.write_bytes(proto.SerializeToString())


def _quantize(source: Path, out: Path, calibration: np.ndarray) -> None:
    """onnxruntime's static quantization with the settings its documentation leads a user to."""
    import logging

    logging.getLogger().setLevel(logging.ERROR)  # the quantizer's "consider pre-processing" advice, per call
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    from maskforge.export.calibration import calibration_reader

    quantize_static(
        str(source),
        str(out),
        calibration_reader(calibration, "input"),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        calibrate_method=CalibrationMethod.MinMax,
    )


def _dense(args, splits, workdir: Path) -> tuple[dict, object]:
    """Train (or reload) the dense network; (record, model)."""
    import torch
    from safetensors.torch import load_file, save_file

    from maskforge.data import derive_seed  # noqa: F401  (import check: maskforge installed)
    from maskforge.dense import DenseConfig, dense_model, train_dense
    from maskforge import archs

    folder = workdir / "dense"
    spec = splits.spec
    arch_args = archs.arch_args(spec.channels, spec.num_classes, (spec.height, spec.width), 1.0)

    def make() -> dict:
        started = time.perf_counter()
        result = train_dense(
            DenseConfig(
                arch=args.arch,
                data=args.data,
                epochs=args.epochs,
                max_steps=args.max_steps,
                seed=args.seed,
                device="cpu",
            )
        )
        seconds = time.perf_counter() - started
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in result.model.state_dict().items()}, str(folder / "model.safetensors"))
        _save_onnx(result.model, spec, folder / "dense.onnx")
        return {"wall_s": seconds, "heldout_acc": result.heldout_acc, "weights": result.weights}

    record = _cached(workdir, "dense", make)
    model = dense_model(args.arch, arch_args, args.seed)
    model.load_state_dict(load_file(str(folder / "model.safetensors")))
    return record, model.eval().to(torch.float32)


def _finetune(model, splits, args, steps_done: list[int]) -> None:
    """Fine-tune the pruned network (the pruning masks stay fixed: prune's forward pre-hooks apply them)."""
    import torch
    import torch.nn.functional as F

    from maskforge.data import iterate_batches, normalize, num_batches

    per_epoch = num_batches(len(splits.train), args.batch_size)
    total = per_epoch * args.finetune_epochs
    if args.max_steps:
        total = min(total, args.max_steps)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(1, total))
    model.train()
    step = 0
    for epoch in range(args.finetune_epochs):
        for x, y in iterate_batches(splits.train, args.batch_size, shuffle=True, seed=args.seed + 1, epoch=epoch):
            if step >= total:
                break
            loss = F.cross_entropy(model(normalize(x, splits.spec)), y, label_smoothing=0.1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            step += 1
    steps_done.append(step)
    model.eval()


def _pruned(args, splits, workdir: Path, dense_record: dict, dense_model, calibration) -> list[Row]:
    import copy

    import torch.nn as nn
    import torch.nn.utils.prune as prune

    rows = []
    for sparsity in args.sparsities:
        name = f"pruned-{sparsity:g}"
        fp32, int8 = workdir / f"{name}.onnx", workdir / f"{name}.int8.onnx"

        def make(sparsity=sparsity, fp32=fp32, int8=int8) -> dict:
            started = time.perf_counter()
            model = copy.deepcopy(dense_model)
            layers = [(m, "weight") for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
            prune.global_unstructured(layers, pruning_method=prune.L1Unstructured, amount=sparsity)
            steps: list[int] = []
            _finetune(model, splits, args, steps)
            for module, parameter in layers:
                prune.remove(module, parameter)  # bake weight x mask into a plain weight
            _save_onnx(model, splits.spec, fp32)
            made = time.perf_counter() - started
            _quantize(fp32, int8, calibration)
            return {"fp32_s": made, "int8_s": time.perf_counter() - started, "finetune_steps": steps[0]}

        record = _cached(workdir, name, make)
        rows.append(Row("pruned", name, str(fp32), f"sparsity {sparsity:g}", dense_record["wall_s"] + record["fp32_s"]))
        rows.append(
            Row(
                "pruned-int8",
                f"{name}-int8",
                str(int8),
                f"sparsity {sparsity:g}",
                dense_record["wall_s"] + record["int8_s"],
            )
        )
    return rows


def _maskforge(args, workdir: Path) -> list[Row]:
    from maskforge import SearchConfig, export_onnx, search

    rows = []
    for topk in args.topk:
        for k in args.ks:
            name = f"maskforge-k{k:g}-{topk}"
            folder = workdir / name

            def make(k=k, topk=topk, folder=folder) -> dict:
                started = time.perf_counter()
                result = search(
                    SearchConfig(
                        arch=args.arch,
                        k=k,
                        data=args.data,
                        epochs=args.epochs,
                        seed=args.seed,
                        topk=topk,
                        max_steps=args.max_steps,
                        device="cpu",
                        out=str(folder),
                    )
                )
                searched = time.perf_counter() - started
                t0 = time.perf_counter()
                fp32 = export_onnx(result.artifact_path, folder / "model.onnx")
                fp32_s = time.perf_counter() - t0
                t0 = time.perf_counter()
                int8 = export_onnx(result.artifact_path, folder / "model.int8.onnx", precision="int8")
                return {
                    "search_s": searched,
                    "fp32_s": fp32_s,
                    "int8_s": time.perf_counter() - t0,
                    "fp32": str(fp32.path),
                    "int8": str(int8.path),
                    "artifact": str(result.artifact_path),
                }

            record = _cached(workdir, name, make)
            setting = f"k {k:g} {topk}"
            rows.append(Row("maskforge", name, record["fp32"], setting, record["search_s"] + record["fp32_s"]))
            rows.append(
                Row("maskforge-int8", f"{name}-int8", record["int8"], setting, record["search_s"] + record["int8_s"])
            )
    return rows


# --- measuring ---------------------------------------------------------------------------------------------


def _measure(rows: list[Row], heldout_x: np.ndarray, heldout_y: np.ndarray, weights: int, args) -> None:
    from maskforge.evaluation.timing import measure_latency
    from maskforge.export import ort_session

    sessions = {}
    for row in rows:
        data = Path(row.path).read_bytes()
        row.bytes, row.gzip_bytes = len(data), len(gzip.compress(data, compresslevel=9))
        row.bits_per_weight, row.gzip_bits_per_weight = 8 * row.bytes / weights, 8 * row.gzip_bytes / weights
        session = ort_session(row.path, threads=args.threads)
        name = session.get_inputs()[0].name
        sessions[row.name] = lambda x, session=session, name=name: session.run(None, {name: x})[0]
        correct = 0
        for start in range(0, len(heldout_x), 500):
            logits = sessions[row.name](heldout_x[start : start + 500])
            correct += int((logits.argmax(axis=1) == heldout_y[start : start + 500]).sum())
        row.top1 = 100.0 * correct / len(heldout_y)
    times = measure_latency(
        sessions,
        heldout_x[:64],
        [1, 64],
        runs=args.runs,
        warmup=3,
        budget_s=args.budget,
        rounds=3,
        threads=args.threads,
    )
    for row in rows:
        (_, b1), (_, b64) = times[row.name]
        row.latency_b1_ms = 1000.0 * float(np.median([s for block in b1 for s in block]))
        row.throughput_b64 = 64.0 / float(np.median([s for block in b64 for s in block]))


def _machine() -> dict:
    cpu = "unknown"
    flags = ""
    try:
        info = Path("/proc/cpuinfo").read_text()
        cpu = next(line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name"))
        flags = next(line for line in info.splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        pass
    import onnxruntime
    import torch

    return {
        "machine": platform.node(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "avx512_vnni": "avx512_vnni" in flags,
        "load": os.getloadavg(),
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def _table(rows: list[Row]) -> str:
    lines = [
        "| method | setting | held-out top-1 % | bytes | gzip -9 bytes | bits/weight (raw / gzip) "
        "| latency b1 ms | b64 images/s | wall s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r.family} | {r.setting} | {r.top1:.2f} | {r.bytes:,} | {r.gzip_bytes:,} | "
            f"{r.bits_per_weight:.2f} / {r.gzip_bits_per_weight:.2f} | {r.latency_b1_ms:.3f} | "
            f"{r.throughput_b64:,.0f} | {r.wall_s:.0f} |"
        )
    return "\n".join(lines)


def _figure(rows: list[Row], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    styles = {
        "dense": ("black", "s"),
        "dense-int8": ("grey", "s"),
        "pruned": ("tab:blue", "o"),
        "pruned-int8": ("tab:cyan", "o"),
        "maskforge": ("tab:red", "^"),
        "maskforge-int8": ("tab:orange", "^"),
    }
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for family, (color, marker) in styles.items():
        chosen = [r for r in rows if r.family == family]
        for topk, fill in (("layer", color), ("global", "none")):
            points = (
                [r for r in chosen if family.startswith("maskforge") and r.setting.endswith(topk)]
                if family.startswith("maskforge")
                else (chosen if topk == "layer" else [])
            )
            if not points:
                continue
            label = family + (f" ({topk} top-k)" if family.startswith("maskforge") else "")
            ax.scatter(
                [r.gzip_bytes for r in points],
                [r.top1 for r in points],
                label=label,
                marker=marker,
                facecolors=fill,
                edgecolors=color,
                s=46,
            )
            for r in points if not family.endswith("int8") else []:  # int8 sits on its fp32 twin
                ax.annotate(
                    r.setting.split()[1] if " " in r.setting else "",
                    (r.gzip_bytes, r.top1),
                    fontsize=7,
                    xytext=(3, 3),
                    textcoords="offset points",
                    color=color,
                )
    ax.set_xscale("log")
    ax.set_xlabel("file size after gzip -9 (bytes, log scale)")
    ax.set_ylabel("held-out top-1 (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path.with_suffix(".png"), dpi=120)
    fig.savefig(path.with_suffix(".svg"))
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--arch", default="fc", help="fc, conv2, conv4, ... (default fc)")
    parser.add_argument("--data", default="fashion-mnist", help="any --data source (default fashion-mnist)")
    parser.add_argument("--epochs", type=int, default=10, help="dense training and each search (default 10)")
    parser.add_argument("--finetune-epochs", type=int, default=2, help="after pruning (default 2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=128, help="fine-tuning batch (training uses 128)")
    parser.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads (default 2)")
    parser.add_argument("--runs", type=int, default=60, help="timed calls per file and batch size")
    parser.add_argument("--budget", type=float, default=240.0, help="seconds for all timing at one batch size")
    parser.add_argument("--workdir", type=Path, default=None, help="default runs/pareto-ARCH[-quick]")
    parser.add_argument("--json", type=Path, default=None, help="one JSON line per file")
    parser.add_argument("--figure", type=Path, default=None, help="PNG + SVG path (default WORKDIR/pareto)")
    parser.add_argument("--k", type=float, action="append", help=f"maskforge's k (repeatable; default {KS})")
    parser.add_argument("--topk", action="append", choices=("layer", "global"), help="top-k rules (default both)")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="1 epoch of at most 60 steps, k 0.3/0.5, sparsity "
        "0.5/0.9, few timing runs: checks the script in a few minutes",
    )
    args = parser.parse_args(argv)
    args.max_steps = None
    args.ks, args.sparsities = tuple(args.k or KS), SPARSITIES
    args.topk = tuple(args.topk or ("layer", "global"))
    if args.quick:
        args.epochs, args.finetune_epochs, args.max_steps, args.runs, args.budget = 1, 1, 60, 10, 30.0
        args.ks, args.sparsities = tuple(args.k or (0.3, 0.5)), (0.5, 0.9)
    workdir = args.workdir or Path("runs") / f"pareto-{args.arch}{'-quick' if args.quick else ''}"
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    from maskforge.data import load_data, normalize

    splits = load_data(args.data)
    heldout_x = normalize(splits.heldout.images, splits.spec).numpy().astype(np.float32)
    heldout_y = splits.heldout.labels.numpy()
    train = splits.train.images
    picks = np.linspace(0, len(train) - 1, 256).astype(int)
    calibration = normalize(train[picks], splits.spec).numpy().astype(np.float32)

    dense_record, model = _dense(args, splits, workdir)
    rows = [Row("dense", "dense", str(workdir / "dense" / "dense.onnx"), "fp32", dense_record["wall_s"])]
    int8 = workdir / "dense" / "dense.int8.onnx"

    def quantize_dense() -> dict:
        t0 = time.perf_counter()
        _quantize(workdir / "dense" / "dense.onnx", int8, calibration)
        return {"wall_s": time.perf_counter() - t0}

    rows.append(
        Row(
            "dense-int8",
            "dense-int8",
            str(int8),
            "int8",
            dense_record["wall_s"] + _cached(workdir, "dense-int8", quantize_dense)["wall_s"],
        )
    )
    rows += _pruned(args, splits, workdir, dense_record, model, calibration)
    rows += _maskforge(args, workdir)
    _measure(rows, heldout_x, heldout_y, dense_record["weights"], args)

    machine = _machine()
    machine.update(
        arch=args.arch,
        data=args.data,
        epochs=args.epochs,
        finetune_epochs=args.finetune_epochs,
        quick=args.quick,
        dense_weights=dense_record["weights"],
        total_s=time.perf_counter() - started,
    )
    print(
        f"{args.arch} on {args.data}, {args.epochs} epoch(s); {machine['cpu']} "
        f"(AVX-512 VNNI: {machine['avx512_vnni']}), {args.threads} onnxruntime thread(s), {machine['date']}, "
        f"load {machine['load'][0]:.1f}; dense network: {dense_record['weights']:,} weights"
    )
    print(_table(rows))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        with open(args.json, "w") as handle:
            handle.write(json.dumps({"machine": machine}) + "\n")
            for row in rows:
                handle.write(json.dumps(asdict(row)) + "\n")
    figure = args.figure or workdir / "pareto"
    _figure(rows, figure, f"{args.arch} on {args.data}, {args.epochs} epoch(s): accuracy against compressed size")
    print(f"figure: {figure.with_suffix('.png')}; total {machine['total_s']:.0f} s")
    return 0


if __name__ == "__main__":
    from maskforge.errors import MaskforgeError

    try:
        raise SystemExit(main())
    except MaskforgeError as exc:  # a bad --data, a missing data set: one line, as the CLI does
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None

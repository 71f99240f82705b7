#!/usr/bin/env python
"""Edge-popup (a subnetwork of random weights) against ordinary dense training, on the same data.

For each architecture (default `conv4` and `fc`) this trains a dense copy the ordinary way with the
library's dense baseline (`maskforge.dense.train_dense`: the same network with plain `nn.Conv2d`/`nn.Linear`
layers, PyTorch's default init, every weight trained, the non-affine batch norm of the ResNets kept) — and runs `maskforge.search` (k = 0.5) on the same data with
the same schedule, then prints one comparison line per architecture: held-out accuracy and wall time.

Shared settings (the paper's CIFAR recipe, which `maskforge search` uses): data `mnist5k` (4,000 train /
1,000 held-out), batch 128 (every training image each epoch: 32 steps, the last of 32 images), SGD lr 0.1, momentum 0.9, weight decay 1e-4,
cosine decay per step, label smoothing as the search's default (`SearchConfig().label_smoothing`, 0.1;
`--label-smoothing 0` for the paper's CIFAR recipe) for both runs, no augmentation for digits; epochs:
conv4 10, fc 30. If dense SGD at lr 0.1
diverges (a non-finite loss), the dense run restarts with Adam (lr 1e-3, same cosine schedule, no weight
decay) and the output says so (`dense_optimizer`).

    python benchmarks/dense_baseline.py                     # the full comparison (minutes on a CPU)
    python benchmarks/dense_baseline.py --epochs 1 --max-steps 5 --json     # a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

import torch

from maskforge import SearchConfig, search
from maskforge.dense import DenseConfig, train_dense

DEFAULT_EPOCHS = {"conv4": 10, "fc": 30}
DATA = "mnist5k"
BATCH = 128
LR, MOMENTUM, WEIGHT_DECAY = 0.1, 0.9, 1e-4
ADAM_LR = 1e-3
K = 0.5


def dense_run(
    arch: str,
    epochs: int,
    *,
    optimizer_name: str,
    seed: int,
    device: str,
    max_steps: int | None,
    label_smoothing: float,
) -> dict:
    """The library's dense baseline (maskforge.dense) with this benchmark's recipe: SGD as the search's, or Adam."""
    if optimizer_name == "sgd":
        recipe = {"optimizer": "sgd", "lr": LR, "momentum": MOMENTUM, "weight_decay": WEIGHT_DECAY}
    else:
        recipe = {"optimizer": "adam", "lr": ADAM_LR, "weight_decay": 0.0}
    result = train_dense(
        DenseConfig(
            arch=arch,
            data=DATA,
            epochs=epochs,
            max_steps=max_steps,
            batch_size=BATCH,
            label_smoothing=label_smoothing,
            seed=seed,
            device=device,
            **recipe,
        )
    )
    return {
        "heldout_acc": result.heldout_acc,
        "seconds": result.seconds,
        "steps": result.steps,
        "finite": result.finite,
        "final_train_loss": result.final_train_loss,
        "optimizer": optimizer_name,
    }


def run_search(
    arch: str, epochs: int, *, seed: int, device: str, max_steps: int | None, label_smoothing: float
) -> dict:
    with tempfile.TemporaryDirectory(prefix="maskforge-baseline-") as out:
        started = time.perf_counter()
        result = search(
            SearchConfig(
                arch=arch,
                k=K,
                data=DATA,
                epochs=epochs,
                max_steps=max_steps,
                seed=seed,
                batch_size=BATCH,
                lr=LR,
                momentum=MOMENTUM,
                weight_decay=WEIGHT_DECAY,
                label_smoothing=label_smoothing,
                device=device,
                out=out,
            )
        )
        seconds = time.perf_counter() - started
    steps = result.metrics[-1]["step"] if result.metrics else 0
    return {
        "heldout_acc": result.heldout_acc,
        "seconds": seconds,
        "steps": steps,
        "search_train_seconds": sum(m["epoch_seconds"] for m in result.metrics),
    }


def compare(
    arch: str,
    epochs: int,
    *,
    seed: int,
    device: str,
    max_steps: int | None,
    dense_optimizer: str,
    label_smoothing: float,
) -> dict:
    dense = dense_run(
        arch,
        epochs,
        optimizer_name=dense_optimizer,
        seed=seed,
        device=device,
        max_steps=max_steps,
        label_smoothing=label_smoothing,
    )
    note = None
    if not dense["finite"] and dense_optimizer == "sgd":
        note = "dense SGD lr 0.1 diverged (non-finite loss); rerun with Adam lr 1e-3"
        dense = dense_run(
            arch,
            epochs,
            optimizer_name="adam",
            seed=seed,
            device=device,
            max_steps=max_steps,
            label_smoothing=label_smoothing,
        )
    popup = run_search(arch, epochs, seed=seed, device=device, max_steps=max_steps, label_smoothing=label_smoothing)
    return {
        "arch": arch,
        "data": DATA,
        "epochs": epochs,
        "max_steps": max_steps,
        "k": K,
        "batch": BATCH,
        "seed": seed,
        "device": device,
        "label_smoothing": label_smoothing,
        "edge_popup_acc": popup["heldout_acc"],
        "edge_popup_s": popup["seconds"],
        "edge_popup_train_s": popup["search_train_seconds"],
        "edge_popup_steps": popup["steps"],
        "dense_acc": dense["heldout_acc"],
        "dense_s": dense["seconds"],
        "dense_steps": dense["steps"],
        "dense_optimizer": dense["optimizer"],
        "dense_final_train_loss": dense["final_train_loss"],
        "note": note,
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "load_avg": os.getloadavg()[0],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--arch", action="append", choices=list(DEFAULT_EPOCHS), help="architecture (repeatable); default: conv4 and fc"
    )
    parser.add_argument("--epochs", type=int, help="override the epochs of every architecture (smoke runs)")
    parser.add_argument("--max-steps", type=int, help="stop both runs after this many optimizer steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument(
        "--dense-optimizer",
        choices=("sgd", "adam"),
        default="sgd",
        help="sgd (the search's recipe; falls back to adam if it diverges) or adam",
    )
    parser.add_argument(
        "--label-smoothing",
        type=float,
        default=SearchConfig().label_smoothing,
        help="for both runs (default: the search's default)",
    )
    parser.add_argument("--threads", type=int, help="torch.set_num_threads")
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("CUDA is not available on this machine (skipped).", file=sys.stderr)
        return 0
    for arch in args.arch or list(DEFAULT_EPOCHS):
        epochs = args.epochs or DEFAULT_EPOCHS[arch]
        record = compare(
            arch,
            epochs,
            seed=args.seed,
            device=args.device,
            max_steps=args.max_steps,
            dense_optimizer=args.dense_optimizer,
            label_smoothing=args.label_smoothing,
        )
        if args.json:
            print(json.dumps(record), flush=True)
        else:
            print(
                f"{arch} ({DATA}, {epochs} epochs, batch {BATCH}, {args.device}): "
                f"edge-popup k={K} held-out {record['edge_popup_acc']:.2%} in {record['edge_popup_s']:.0f} s | "
                f"dense ({record['dense_optimizer']}) held-out {record['dense_acc']:.2%} in "
                f"{record['dense_s']:.0f} s" + (f" | {record['note']}" if record["note"] else ""),
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())

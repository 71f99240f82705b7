#!/usr/bin/env python
"""Edge-popup (a subnetwork of random weights) against ordinary dense training, on the same data.

For each architecture (default `conv4` and `fc`) this trains a dense copy the ordinary way — the same
network with plain `nn.Conv2d`/`nn.Linear` layers (PyTorch's default init, every weight trained, the
non-affine batch norm of the ResNets kept) — and runs `maskforge.search` (k = 0.5) on the same data with
the same schedule, then prints one comparison line per architecture: held-out accuracy and wall time.

Shared settings (the paper's CIFAR recipe, which `maskforge search` uses): data `mnist5k` (4,000 train /
1,000 held-out), batch 128 (last partial batch dropped), SGD lr 0.1, momentum 0.9, weight decay 1e-4,
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
import math
import os
import platform
import sys
import tempfile
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from maskforge import SearchConfig, archs, search
from maskforge.data import iterate_batches, load_data, normalize, num_batches
from maskforge.layers import MaskedConv2d, masked_modules

DEFAULT_EPOCHS = {"conv4": 10, "fc": 30}
DATA = "mnist5k"
BATCH = 128
LR, MOMENTUM, WEIGHT_DECAY = 0.1, 0.9, 1e-4
ADAM_LR = 1e-3
K = 0.5


def dense_model(arch: str, in_channels: int, num_classes: int, image_size: tuple[int, int], seed: int) -> nn.Module:
    """`arch` with every masked layer replaced by an ordinary trainable layer of the same shape."""
    with torch.device("meta"):
        model = archs.build_structure(arch, archs.arch_args(in_channels, num_classes, image_size), K)
    for name, layer in list(masked_modules(model).items()):
        if isinstance(layer, MaskedConv2d):
            plain: nn.Module = nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride,
                                         layer.padding, layer.dilation, layer.groups, bias=False)
        else:
            plain = nn.Linear(layer.in_features, layer.out_features, bias=False)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, plain)
    torch.manual_seed(seed)
    model.to_empty(device="cpu")
    for module in model.modules():  # PyTorch's default init for the new layers, fresh BN statistics
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
    return model


def _lr(step: int, total: int, base: float) -> float:
    return 0.5 * base * (1.0 + math.cos(math.pi * min(1.0, step / max(1, total))))


def _accuracy(model: nn.Module, dataset, spec, device: torch.device) -> float:
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for images, labels in iterate_batches(dataset, 256, shuffle=False):
            logits = model(normalize(images.to(device), spec))
            correct += int((logits.argmax(1) == labels.to(device)).sum())
            total += labels.numel()
    return correct / max(1, total)


def train_dense(arch: str, epochs: int, *, optimizer_name: str, seed: int, device: torch.device,
                max_steps: int | None, label_smoothing: float) -> dict:
    """Ordinary training of the dense copy; returns accuracy, time and whether the loss stayed finite."""
    splits = load_data(DATA)
    spec = splits.spec
    model = dense_model(arch, spec.channels, spec.num_classes, (spec.height, spec.width), seed).to(device)
    params = list(model.parameters())
    if optimizer_name == "sgd":
        optimizer: torch.optim.Optimizer = torch.optim.SGD(params, lr=LR, momentum=MOMENTUM,
                                                           weight_decay=WEIGHT_DECAY)
        base_lr = LR
    else:
        optimizer = torch.optim.Adam(params, lr=ADAM_LR)
        base_lr = ADAM_LR
    drop_last = len(splits.train) > BATCH
    total = num_batches(len(splits.train), BATCH, drop_last=drop_last) * epochs
    if max_steps is not None:
        total = min(total, max_steps)
    started = time.perf_counter()
    step, finite, last_loss = 0, True, float("nan")
    for epoch in range(epochs):
        model.train()
        for images, labels in iterate_batches(splits.train, BATCH, shuffle=True, seed=seed, epoch=epoch,
                                              drop_last=drop_last):
            if step >= total:
                break
            for group in optimizer.param_groups:
                group["lr"] = _lr(step, total, base_lr)
            loss = F.cross_entropy(model(normalize(images.to(device), spec)), labels.to(device),
                                   label_smoothing=label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            last_loss = float(loss.detach())
            if not math.isfinite(last_loss):
                finite = False
                break
        if not finite or step >= total:
            break
    train_s = time.perf_counter() - started
    accuracy = _accuracy(model, splits.heldout, spec, device) if finite else float("nan")
    return {"heldout_acc": accuracy, "seconds": train_s, "steps": step, "finite": finite,
            "final_train_loss": last_loss, "optimizer": optimizer_name}


def run_search(arch: str, epochs: int, *, seed: int, device: str, max_steps: int | None,
               label_smoothing: float) -> dict:
    with tempfile.TemporaryDirectory(prefix="maskforge-baseline-") as out:
        started = time.perf_counter()
        result = search(SearchConfig(arch=arch, k=K, data=DATA, epochs=epochs, max_steps=max_steps, seed=seed,
                                     batch_size=BATCH, lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY,
                                     label_smoothing=label_smoothing, device=device, out=out), progress=False)
        seconds = time.perf_counter() - started
    steps = result.metrics[-1]["step"] if result.metrics else 0
    return {"heldout_acc": result.heldout_acc, "seconds": seconds, "steps": steps,
            "search_train_seconds": sum(m["epoch_seconds"] for m in result.metrics)}


def compare(arch: str, epochs: int, *, seed: int, device: str, max_steps: int | None, dense_optimizer: str,
            label_smoothing: float) -> dict:
    torch_device = torch.device("cuda" if device == "cuda" else "cpu")
    dense = train_dense(arch, epochs, optimizer_name=dense_optimizer, seed=seed, device=torch_device,
                        max_steps=max_steps, label_smoothing=label_smoothing)
    note = None
    if not dense["finite"] and dense_optimizer == "sgd":
        note = "dense SGD lr 0.1 diverged (non-finite loss); rerun with Adam lr 1e-3"
        dense = train_dense(arch, epochs, optimizer_name="adam", seed=seed, device=torch_device,
                            max_steps=max_steps, label_smoothing=label_smoothing)
    popup = run_search(arch, epochs, seed=seed, device=device, max_steps=max_steps,
                       label_smoothing=label_smoothing)
    return {
        "arch": arch, "data": DATA, "epochs": epochs, "max_steps": max_steps, "k": K, "batch": BATCH,
        "seed": seed, "device": device, "label_smoothing": label_smoothing,
        "edge_popup_acc": popup["heldout_acc"], "edge_popup_s": popup["seconds"],
        "edge_popup_train_s": popup["search_train_seconds"], "edge_popup_steps": popup["steps"],
        "dense_acc": dense["heldout_acc"], "dense_s": dense["seconds"], "dense_steps": dense["steps"],
        "dense_optimizer": dense["optimizer"], "dense_final_train_loss": dense["final_train_loss"],
        "note": note, "torch": torch.__version__, "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(), "load_avg": os.getloadavg()[0],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", action="append", choices=list(DEFAULT_EPOCHS),
                        help="architecture (repeatable); default: conv4 and fc")
    parser.add_argument("--epochs", type=int, help="override the epochs of every architecture (smoke runs)")
    parser.add_argument("--max-steps", type=int, help="stop both runs after this many optimizer steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--dense-optimizer", choices=("sgd", "adam"), default="sgd",
                        help="sgd (the search's recipe; falls back to adam if it diverges) or adam")
    parser.add_argument("--label-smoothing", type=float, default=SearchConfig().label_smoothing,
                        help="for both runs (default: the search's default)")
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
        record = compare(arch, epochs, seed=args.seed, device=args.device, max_steps=args.max_steps,
                         dense_optimizer=args.dense_optimizer, label_smoothing=args.label_smoothing)
        if args.json:
            print(json.dumps(record), flush=True)
        else:
            print(f"{arch} ({DATA}, {epochs} epochs, batch {BATCH}, {args.device}): "
                  f"edge-popup k={K} held-out {record['edge_popup_acc']:.2%} in {record['edge_popup_s']:.0f} s | "
                  f"dense ({record['dense_optimizer']}) held-out {record['dense_acc']:.2%} in "
                  f"{record['dense_s']:.0f} s" + (f" | {record['note']}" if record["note"] else ""), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

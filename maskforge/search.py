"""The edge-popup search loop: SGD on the scores only, cosine schedule, held-out evaluation each epoch.

`search(SearchConfig(...))` is what `maskforge search` runs. Everything that decides the result is a
pure function of the config: weights and scores come from the seed, the batch order from (seed, epoch),
augmentation from (seed, epoch, step). So on CPU the same arguments give a byte-identical artifact.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import __version__, archs, regen
from .artifact import Artifact, build_artifact, save_artifact
from .data import DataSplits, augment_batch, iterate_batches, load_data, normalize, num_batches
from .errors import MaskforgeError
from .fileio import atomic_write, ensure_writable_dir

ARTIFACT_NAME = "artifact.safetensors"
METRICS_NAME = "metrics.jsonl"
CONFIG_NAME = "config.json"


@dataclass
class SearchConfig:
    """Every argument of a search. Defaults are the paper's CIFAR settings (section 4, appendix B)."""

    arch: str = "conv4"
    k: float = 0.5                   # fraction of weights kept in every layer
    data: str = "mnist5k"            # built-in demo set, or a CIFAR-10 / MNIST / image folder
    epochs: int = 10
    max_steps: int | None = None     # stop after this many optimizer steps (smoke runs)
    batch_size: int = 128            # per process; under torchrun the global batch is this x world size
    lr: float = 0.1                  # for batch 128; scaled linearly with the global batch under torchrun
    momentum: float = 0.9
    weight_decay: float = 1e-4       # on the scores (they are the only parameters)
    label_smoothing: float = 0.0
    warmup_epochs: int = 0           # linear warm-up before the cosine decay
    seed: int = 0
    init: str = "signed_constant"    # weight distribution, see regen.DISTRIBUTIONS
    scale_fan: bool = False          # sigma = sqrt(2 / (k * fan_in)) instead of sqrt(2 / fan_in)
    device: str = "auto"             # auto | cpu | cuda
    workers: int = 2                 # data-loader processes for image folders (in-memory sets need none)
    image_size: int | None = None    # image folders only: resize to this side
    out: str = "runs/search"

    def validate(self) -> None:
        archs.get_arch(self.arch)
        if not (isinstance(self.k, (int, float)) and 0.0 < self.k <= 1.0):
            raise MaskforgeError(f"k must be in (0, 1] (the fraction of weights kept), got {self.k}")
        if self.init not in regen.DISTRIBUTIONS:
            raise MaskforgeError(f"unknown --init {self.init!r}; choose from {', '.join(regen.DISTRIBUTIONS)}")
        checks = [(self.epochs >= 1, "epochs must be at least 1"),
                  (self.max_steps is None or self.max_steps >= 1, "max-steps must be at least 1"),
                  (self.batch_size >= 1, "batch-size must be at least 1"),
                  (self.lr > 0, "lr must be positive"),
                  (0 <= self.momentum < 1, "momentum must be in [0, 1)"),
                  (self.weight_decay >= 0, "weight-decay must be non-negative"),
                  (0 <= self.label_smoothing < 1, "label-smoothing must be in [0, 1)"),
                  (0 <= self.warmup_epochs < self.epochs or self.warmup_epochs == 0,
                   "warmup-epochs must be smaller than epochs"),
                  (isinstance(self.seed, int) and self.seed >= 0, "seed must be a non-negative integer"),
                  (self.device in ("auto", "cpu", "cuda"), "device must be auto, cpu or cuda"),
                  (self.workers >= 0, "workers must be non-negative")]
        for ok, message in checks:
            if not ok:
                raise MaskforgeError(message)


@dataclass
class SearchResult:
    artifact: Artifact
    artifact_path: Path
    metrics: list[dict] = field(default_factory=list)

    @property
    def heldout_acc(self) -> float:
        return self.metrics[-1]["heldout_acc"]


def resolve_device(choice: str) -> torch.device:
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise MaskforgeError("--device cuda was requested but CUDA is not available on this machine")
    return torch.device(choice)


def lr_at(step: int, total_steps: int, warmup_steps: int, base_lr: float) -> float:
    """Linear warm-up to base_lr, then cosine decay to 0 at total_steps (per optimizer step)."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * base_lr * (1.0 + math.cos(math.pi * min(1.0, progress)))


def evaluate_accuracy(model: nn.Module, dataset, splits: DataSplits, device: torch.device,
                      batch_size: int = 256, workers: int = 0) -> tuple[float, float]:
    """(loss, accuracy) of `model` on every example of `dataset` once."""
    model.eval()
    correct, total, loss_sum = 0, 0, 0.0
    with torch.no_grad(), _autocast(device):
        for images, labels in iterate_batches(dataset, batch_size, shuffle=False, workers=workers,
                                              pin_memory=device.type == "cuda"):
            images, labels = _to_device(images, labels, splits, device)
            logits = model(images).float()
            loss_sum += float(F.cross_entropy(logits, labels, reduction="sum"))
            correct += int((logits.argmax(1) == labels).sum())
            total += labels.numel()
    return loss_sum / max(1, total), correct / max(1, total)


def _to_device(images: torch.Tensor, labels: torch.Tensor, splits: DataSplits, device: torch.device):
    # Normalization happens on the device: the loader ships compact uint8 images.
    images = images.to(device, non_blocking=True)
    x = normalize(images, splits.spec)
    if device.type == "cuda" and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, labels.to(device, non_blocking=True)


def _autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def prepare(config: SearchConfig) -> tuple[DataSplits, nn.Module, dict]:
    """Validate the config, load the data and build the seeded model (nothing is written)."""
    config.validate()
    splits = load_data(config.data, image_size=config.image_size)
    spec = splits.spec
    args = archs.arch_args(spec.channels, spec.num_classes, (spec.height, spec.width))
    model = archs.create_model(config.arch, **args, k=config.k, seed=config.seed, init=config.init,
                               scale_fan=config.scale_fan)
    return splits, model, args


def search(config: SearchConfig, *, progress: bool = True,
           on_epoch: Callable[[dict], None] | None = None) -> SearchResult:
    """Run edge-popup and write `<out>/artifact.safetensors`, `metrics.jsonl` and `config.json`.

    >>> from maskforge import SearchConfig, search
    >>> result = search(SearchConfig(arch="fc", k=0.5, epochs=1, out="runs/fc"))   # doctest: +SKIP
    >>> round(result.heldout_acc, 2)                                                # doctest: +SKIP
    0.9
    """
    splits, model, args = prepare(config)
    device = resolve_device(config.device)
    out = ensure_writable_dir(config.out)
    atomic_write(out / CONFIG_NAME, json.dumps(asdict(config), indent=2, sort_keys=True) + "\n")

    model.to(device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        model.to(memory_format=torch.channels_last)
    scores = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(scores, lr=config.lr, momentum=config.momentum,
                                weight_decay=config.weight_decay)
    drop_last = len(splits.train) > config.batch_size
    steps_per_epoch = num_batches(len(splits.train), config.batch_size, drop_last=drop_last)
    total_steps = steps_per_epoch * config.epochs
    if config.max_steps is not None:
        total_steps = min(total_steps, config.max_steps)
    warmup_steps = config.warmup_epochs * steps_per_epoch

    metrics: list[dict] = []
    step = 0
    with _ProgressBar(enabled=progress, total=total_steps) as bar:
        for epoch in range(config.epochs):
            if step >= total_steps:
                break
            model.train()
            started, seen, loss_sum, correct = time.perf_counter(), 0, 0.0, 0
            batches = iterate_batches(splits.train, config.batch_size, shuffle=True, seed=config.seed,
                                      epoch=epoch, drop_last=drop_last, workers=config.workers,
                                      pin_memory=device.type == "cuda")
            for batch_index, (images, labels) in enumerate(batches):
                if step >= total_steps:
                    break
                if splits.augment:
                    generator = torch.Generator().manual_seed(_mix(config.seed, epoch, batch_index))
                    images = augment_batch(images, generator)
                x, y = _to_device(images, labels, splits, device)
                for group in optimizer.param_groups:
                    group["lr"] = lr_at(step, total_steps, warmup_steps, config.lr)
                with _autocast(device):
                    logits = model(x)
                    loss = F.cross_entropy(logits.float(), y, label_smoothing=config.label_smoothing)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                step += 1
                seen += y.numel()
                loss_sum += float(loss.detach()) * y.numel()
                correct += int((logits.argmax(1) == y).sum())
                elapsed = time.perf_counter() - started
                bar.update(epoch=epoch + 1, epochs=config.epochs, loss=loss_sum / seen, acc=correct / seen,
                           images_per_s=seen / max(elapsed, 1e-9))
            train_time = time.perf_counter() - started
            heldout_loss, heldout_acc = evaluate_accuracy(model, splits.heldout, splits, device,
                                                          workers=config.workers)
            record = {"epoch": epoch + 1, "step": step, "lr": optimizer.param_groups[0]["lr"],
                      "train_loss": loss_sum / max(1, seen), "train_acc": correct / max(1, seen),
                      "heldout_loss": heldout_loss, "heldout_acc": heldout_acc,
                      "images_per_s": seen / max(train_time, 1e-9), "epoch_seconds": train_time}
            metrics.append(record)
            atomic_write(out / METRICS_NAME, "".join(json.dumps(m, sort_keys=True) + "\n" for m in metrics))
            bar.log(f"epoch {epoch + 1}/{config.epochs}  loss {record['train_loss']:.4f}  "
                    f"held-out acc {heldout_acc:.2%}  {record['images_per_s']:.0f} img/s")
            if on_epoch:
                on_epoch(record)

    model.cpu()
    provenance = {"maskforge_version": __version__, "torch_version": torch.__version__.split("+")[0],
                  "data": splits.name, "data_kind": splits.kind, "epochs": config.epochs, "steps": step,
                  "batch_size": config.batch_size, "lr": config.lr,
                  "heldout_acc": metrics[-1]["heldout_acc"] if metrics else None,
                  "heldout_examples": len(splits.heldout)}
    artifact = build_artifact(model, arch=config.arch, arch_args=args, spec=splits.spec, seed=config.seed,
                              init=config.init, scale_fan=config.scale_fan, k=float(config.k),
                              provenance=provenance)
    path = save_artifact(artifact, out / ARTIFACT_NAME)
    return SearchResult(artifact, path, metrics)


def _mix(*values: int) -> int:
    """A 63-bit seed from several integers (for per-step generators), stable across runs."""
    result = 0
    for value in values:
        result = (result * 1_000_003 + int(value) + 1) % (2 ** 63)
    return result


class _ProgressBar:
    """A rich progress bar with loss, accuracy and images/s; a no-op when disabled."""

    def __init__(self, enabled: bool, total: int) -> None:
        self.enabled, self.total = enabled, total
        self._progress = None

    def __enter__(self) -> "_ProgressBar":
        if self.enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
            self._progress = Progress(
                TextColumn("[bold]search[/] epoch {task.fields[epoch]}/{task.fields[epochs]}"), BarColumn(),
                MofNCompleteColumn(), TextColumn("loss {task.fields[loss]:.3f}  acc {task.fields[acc]:.1%}  "
                                                 "{task.fields[images_per_s]:.0f} img/s"),
                TimeRemainingColumn())
            self._progress.__enter__()
            self._task = self._progress.add_task("search", total=self.total, epoch=0, epochs=0, loss=0.0,
                                                 acc=0.0, images_per_s=0.0)
        return self

    def update(self, **fields) -> None:
        if self._progress is not None:
            self._progress.update(self._task, advance=1, **fields)

    def log(self, message: str) -> None:
        if self._progress is not None:
            self._progress.console.print(message)

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)

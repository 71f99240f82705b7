"""The dense baseline: the same architecture with every weight learned, trained the ordinary way.

The paper compares each random subnetwork with the same network trained normally ("the line to beat").
`train_dense(DenseConfig(...))` builds the architecture from the registry, swaps every masked layer for a
plain `nn.Conv2d`/`nn.Linear` of the same shape (bias-free, as in the search; the ResNets keep their
non-affine batch norm), initializes it with PyTorch's defaults from the seed and trains every weight.

Recipe (the default `DenseConfig`; docs/SWEEP.md says why): Adam, lr 1e-3, cosine decay to 0 per step,
no weight decay, with the search's data, batch order, augmentation rule, batch size, epochs and label
smoothing. The search's own recipe (SGD lr 0.1, momentum 0.9, weight decay 1e-4) trains the bias- and
batch-norm-free Conv-n poorly (BENCHMARKS.md section 4), so it is available (`optimizer="sgd"`) but not
the default.

A run folder (`out`) holds `config.json`, `metrics.jsonl` (the search's per-epoch fields) and, written
last, `dense.json` (the result). There is no checkpoint: an interrupted dense run starts over.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import __version__, archs
from .data import augment_batch, iterate_batches, load_data, normalize, num_batches
from .errors import MaskforgeError
from .fileio import atomic_write, ensure_writable_dir
from .layers import MaskedConv2d, masked_modules
from .search import CONFIG_NAME, METRICS_NAME, SearchConfig, evaluate_accuracy, lr_at, resolve_device

RESULT_NAME = "dense.json"
OPTIMIZERS = ("adam", "sgd")


@dataclass
class DenseConfig:
    """Every argument of a dense-baseline run (the fields it shares with SearchConfig mean the same)."""

    arch: str = "conv4"
    width: float = 1.0
    data: str = "mnist5k"
    image_size: int | None = None
    epochs: int = 10
    max_steps: int | None = None
    batch_size: int = 128
    label_smoothing: float = 0.1
    seed: int = 0                  # PyTorch's default init is drawn from a generator seeded by this
    optimizer: str = "adam"        # adam (default) or sgd (the search's recipe)
    lr: float = 1e-3               # peak of the cosine schedule
    momentum: float = 0.9          # sgd only
    weight_decay: float = 0.0
    device: str = "auto"
    workers: int | None = None
    out: str | None = None         # run folder; None: nothing is written

    def validate(self) -> None:
        SearchConfig(arch=self.arch, width=self.width, data=self.data, image_size=self.image_size,
                     epochs=self.epochs, max_steps=self.max_steps, batch_size=self.batch_size,
                     label_smoothing=self.label_smoothing, seed=self.seed, device=self.device,
                     workers=self.workers, lr=self.lr, weight_decay=self.weight_decay,
                     momentum=self.momentum if self.optimizer == "sgd" else 0.0).validate()
        if self.optimizer not in OPTIMIZERS:
            raise MaskforgeError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")

    @classmethod
    def like(cls, search: SearchConfig, **recipe) -> "DenseConfig":
        """The dense twin of a search: its shared fields (arch, width, data, epochs, seed...) plus `recipe`."""
        shared = {f.name: getattr(search, f.name) for f in fields(cls) if hasattr(search, f.name)}
        for name in ("lr", "momentum", "weight_decay", "out"):  # the dense recipe, not the search's
            shared.pop(name)
        return cls(**{**shared, **recipe})


@dataclass
class DenseResult:
    heldout_acc: float             # after the last epoch (NaN if the loss diverged)
    num_classes: int
    weights: int                   # trained weights of the conv/linear layers
    steps: int
    finite: bool                   # False: the loss became NaN/inf and training stopped
    final_train_loss: float
    seconds: float
    metrics: list[dict] = field(default_factory=list)
    model: nn.Module | None = field(default=None, repr=False)   # the trained network (eval mode, its device)


def dense_model(arch: str, args: dict, seed: int) -> nn.Module:
    """`arch` with every masked layer replaced by an ordinary trainable layer of the same shape,
    initialized by PyTorch's defaults from a generator seeded by `seed` (CPU tensors)."""
    with torch.device("meta"):
        model = archs.build_structure(arch, args, 0.5)
    for name, layer in list(masked_modules(model).items()):
        if isinstance(layer, MaskedConv2d):
            plain: nn.Module = nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride,
                                         layer.padding, layer.dilation, layer.groups, bias=False)
        else:
            plain = nn.Linear(layer.in_features, layer.out_features, bias=False)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, plain)
    model.to_empty(device="cpu")
    with torch.random.fork_rng(devices=[]):  # the default init draws from the global generator
        torch.manual_seed(_derived_seed("init", seed))
        for module in model.modules():
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.reset_running_stats()
    return model


def _derived_seed(*parts) -> int:
    """A 63-bit seed hashed from `parts` (any seed the format allows works; no overflow)."""
    text = "maskforge-dense/" + "/".join(str(p) for p in parts)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1


def _optimizer(config: DenseConfig, params) -> torch.optim.Optimizer:
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)


def train_dense(config: DenseConfig, *, on_epoch: Callable[[dict], None] | None = None) -> DenseResult:
    """Train the dense baseline; with `config.out`, write config.json, metrics.jsonl and dense.json there.

    >>> from maskforge.dense import DenseConfig, train_dense
    >>> result = train_dense(DenseConfig(arch="fc", epochs=1))        # doctest: +SKIP
    >>> round(result.heldout_acc, 2)                                  # doctest: +SKIP
    0.9
    """
    config.validate()
    device = resolve_device(config.device)
    splits = load_data(config.data, image_size=config.image_size)
    spec = splits.spec
    args = archs.arch_args(spec.channels, spec.num_classes, (spec.height, spec.width), config.width)
    model = dense_model(config.arch, args, config.seed).to(device)
    out = Path(config.out) if config.out else None
    if out is not None:  # only once the data loaded and the network built: a bad argument leaves nothing
        atomic_write(ensure_writable_dir(out) / CONFIG_NAME,
                     json.dumps(asdict(config), indent=2, sort_keys=True) + "\n")
    run = _Run(config, model, _optimizer(config, list(model.parameters())), splits, device)
    started, metrics = time.perf_counter(), []
    for epoch in range(config.epochs):
        if run.step >= run.total_steps or not run.finite:
            break
        record = run.train_epoch(epoch)
        metrics.append(record)
        if out is not None:
            atomic_write(out / METRICS_NAME, "".join(json.dumps(m, sort_keys=True) + "\n" for m in metrics))
        if on_epoch:
            on_epoch(record)
    weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    result = DenseResult(heldout_acc=metrics[-1]["heldout_acc"] if metrics else math.nan,
                         num_classes=spec.num_classes, weights=weights, steps=run.step, finite=run.finite,
                         final_train_loss=run.last_loss, seconds=time.perf_counter() - started, metrics=metrics,
                         model=model.eval())
    if out is not None:
        document = {name: (None if isinstance(value, float) and not math.isfinite(value) else value)
                    for name, value in vars(result).items() if name not in ("metrics", "model")}
        document["versions"] = {"maskforge": __version__, "torch": torch.__version__.split("+")[0]}
        atomic_write(out / RESULT_NAME, json.dumps(document, indent=2, sort_keys=True) + "\n")
    return result


class _Run:
    """The training state of one dense run: model, optimizer, schedule position."""

    def __init__(self, config: DenseConfig, model: nn.Module, optimizer: torch.optim.Optimizer, splits,
                 device: torch.device) -> None:
        self.config, self.model, self.optimizer, self.splits, self.device = config, model, optimizer, splits, device
        self.drop_last = len(splits.train) > config.batch_size  # the search's rule
        total = num_batches(len(splits.train), config.batch_size, drop_last=self.drop_last) * config.epochs
        self.total_steps = min(total, config.max_steps) if config.max_steps is not None else total
        self.step, self.finite, self.last_loss = 0, True, math.nan

    def train_epoch(self, epoch: int) -> dict:
        """One pass over the training split (or what is left of the step budget), then the held-out check."""
        config, splits = self.config, self.splits
        self.model.train()
        started, loss_sum, correct, seen = time.perf_counter(), 0.0, 0, 0
        batches = iterate_batches(splits.train, config.batch_size, shuffle=True, seed=config.seed, epoch=epoch,
                                  drop_last=self.drop_last, workers=config.workers or 0)
        for batch_index, (images, labels) in enumerate(batches):
            if self.step >= self.total_steps:
                break
            images, labels = images.to(self.device), labels.to(self.device)
            if splits.augment:
                generator = torch.Generator(device=images.device)
                generator.manual_seed(_derived_seed("augment", config.seed, epoch, batch_index))
                images = augment_batch(images, generator)
            for group in self.optimizer.param_groups:
                group["lr"] = lr_at(self.step, self.total_steps, 0, config.lr)
            logits = self.model(normalize(images, splits.spec))
            loss = F.cross_entropy(logits, labels, label_smoothing=config.label_smoothing)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            self.step += 1
            self.last_loss = float(loss.detach())
            loss_sum += self.last_loss * labels.numel()
            correct += int((logits.argmax(1) == labels).sum())
            seen += labels.numel()
            if not math.isfinite(self.last_loss):
                self.finite = False  # diverged: stop; the result says so
                break
        seconds = time.perf_counter() - started
        heldout_loss, heldout_acc = evaluate_accuracy(self.model, splits.heldout, splits, self.device)
        last_lr = lr_at(self.step - 1, self.total_steps, 0, config.lr) if self.step else config.lr
        return {"epoch": epoch + 1, "step": self.step, "lr": last_lr, "train_loss": loss_sum / max(1, seen),
                "train_acc": correct / max(1, seen), "heldout_loss": heldout_loss,
                "heldout_acc": heldout_acc if self.finite else math.nan, "epoch_seconds": seconds}

"""The dense baseline: the same architecture with every weight learned, trained the ordinary way.

The paper compares each random subnetwork with the same network trained normally ("the line to beat").
`train_dense(DenseConfig(...))` builds the architecture from the registry, swaps every masked layer for a
plain `nn.Conv2d`/`nn.Linear` of the same shape (bias-free, as in the search; the ResNets keep their
non-affine batch norm), initializes it with PyTorch's defaults from the seed and trains every weight.

It trains with the search's own steps (maskforge.searches: `setup`, `start_epoch`, `train_one_epoch`,
`end_epoch`), so data, batch order, augmentation, schedule, device choices and the held-out evaluation
are the search's, one piece of code for both: every training image every epoch (the last batch may be
short), the batch order and augmentation from the same seed, the warm-up + cosine schedule per step, the
same metrics records. Only the network and the optimizer differ.

Recipe (the default `DenseConfig`; docs/SWEEP.md says why): Adam, lr 1e-3, cosine decay to 0 per step,
no weight decay, with the search's batch size, epochs and label smoothing. The search's own recipe (SGD
lr 0.1, momentum 0.9, weight decay 1e-4) trains the bias- and batch-norm-free Conv-n poorly
(BENCHMARKS.md section 4), so it is available (`optimizer="sgd"`) but not the default.

A run folder (`out`) holds `config.json`, `metrics.jsonl` (the search's per-epoch records) and, written
last, `dense.json` (the result). There is no checkpoint: an interrupted dense run starts over. One
process (a sweep runs its points one by one; it refuses torchrun).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

from . import __version__, archs, convert
from .data import derive_seed, load_data
from .distributed import World
from .errors import MaskforgeError
from .fileio import atomic_write, ensure_writable_dir
from .runfiles import DENSE_RESULT_NAME
from .schema import SearchConfig
from .searches import CONFIG_NAME, StepProgress, end_epoch, setup, start_epoch, train_one_epoch, write_metrics
from .searches.notices import CostWatch

RESULT_NAME = DENSE_RESULT_NAME
OPTIMIZERS = ("adam", "sgd")
#: DenseConfig fields that are the dense recipe's own, not the search's (a twin search leaves them out).
RECIPE = ("optimizer", "lr", "momentum", "weight_decay", "out")


@dataclass
class DenseConfig:
    """Every argument of a dense-baseline run (the fields it shares with SearchConfig mean the same)."""

    arch: str = "conv4"
    arch_args: str | None = None  # a builder reference's keyword arguments (JSON object), as SearchConfig
    width: float = 1.0
    data: str = "mnist5k"
    image_size: int | None = None
    epochs: int = 10
    max_steps: int | None = None
    batch_size: int = 128
    label_smoothing: float = 0.1
    seed: int = 0  # PyTorch's default init is drawn from a generator seeded by this
    optimizer: str = "adam"  # adam (default) or sgd (the search's recipe)
    lr: float = 1e-3  # peak of the cosine schedule
    momentum: float = 0.9  # sgd only
    weight_decay: float = 0.0
    device: str = "auto"
    # The search's device choices (None/False: the search's defaults for the device), so a sweep's dense
    # baseline computes as its searches do.
    precision: str | None = None
    channels_last: bool | None = None
    compile: bool = False
    deterministic: bool = False
    workers: int | None = None
    out: str | None = None  # run folder; None: nothing is written

    def search_config(self) -> SearchConfig:
        """The search whose data, schedule and device this run shares (validated by the schema; messages
        name the field). Its lr, momentum and weight decay are the dense recipe's."""
        values = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("optimizer", "out")}
        if self.out:
            values["out"] = self.out
        config = SearchConfig.from_dict(values, "dense config")
        archs.check_width(self.width, self.arch)
        if self.optimizer not in OPTIMIZERS:
            raise MaskforgeError(
                f"dense config: optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}"
            )
        return config

    def validate(self) -> None:
        self.search_config()

    @classmethod
    def like(cls, search: SearchConfig, **recipe) -> "DenseConfig":
        """The dense twin of a search: its shared fields (arch, width, data, epochs, seed...) plus `recipe`."""
        shared = {
            f.name: getattr(search, f.name) for f in fields(cls) if f.name not in RECIPE and hasattr(search, f.name)
        }
        if shared.get("width") is None:
            shared["width"] = 1.0  # the architecture's default, spelled out
        return cls(**{**shared, **recipe})


@dataclass
class DenseResult:
    heldout_acc: float  # after the last epoch (NaN if the loss diverged)
    num_classes: int
    weights: int  # trained weights of the conv/linear layers
    steps: int
    finite: bool  # False: the loss became NaN/inf and training stopped
    final_train_loss: float  # mean training loss of the last epoch
    seconds: float
    metrics: list[dict] = field(default_factory=list)
    model: nn.Module | None = field(default=None, repr=False)  # the trained network (eval mode, its device)


def dense_model(arch: str, args: dict, seed: int) -> nn.Module:
    """`arch` with every masked layer replaced by an ordinary trainable layer of the same shape,
    initialized by PyTorch's defaults from a generator seeded by `seed` (CPU tensors)."""
    with torch.device("meta"):
        model = convert.plain_layers(archs.build_structure(arch, args, 0.5))
    model.to_empty(device="cpu")
    with torch.random.fork_rng(devices=[]):  # the default init draws from the global generator
        torch.manual_seed(derive_seed("maskforge/dense-init/v1", seed))
        for module in model.modules():
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.reset_running_stats()
    convert.fill_fixed(model, seed)  # the fixed tensors of a converted model (FORMAT.md 2.6) stay fixed
    return model


def train_dense(
    config: DenseConfig,
    *,
    on_step: Callable[[StepProgress], None] | None = None,
    on_epoch: Callable[[dict], None] | None = None,
) -> DenseResult:
    """Train the dense baseline; with `config.out`, write config.json, metrics.jsonl and dense.json there.
    `on_step` and `on_epoch` are called as by `maskforge.searches.search`.

    >>> from maskforge.dense import DenseConfig, train_dense
    >>> result = train_dense(DenseConfig(arch="fc", epochs=1))        # doctest: +SKIP
    >>> round(result.heldout_acc, 2)                                  # doctest: +SKIP
    0.9
    """
    twin = config.search_config()
    splits = load_data(twin.data, image_size=twin.image_size)
    spec = splits.spec
    convert.trust(config.arch)
    args = archs.arch_args(
        spec.channels, spec.num_classes, (spec.height, spec.width), config.width, twin.builder_args()
    )
    model = dense_model(config.arch, args, config.seed)
    session = setup(twin, splits, model, args, None, World())  # SGD with the twin's lr, momentum, decay
    out = Path(config.out) if config.out else None
    if out is not None:  # only once the data, the network and the device choices are settled: a bad
        # argument, or a choice this machine cannot honour, leaves nothing behind
        atomic_write(
            ensure_writable_dir(out) / CONFIG_NAME, json.dumps(asdict(config), indent=2, sort_keys=True) + "\n"
        )
    if config.optimizer == "adam":
        session.optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    started, finite = time.perf_counter(), True
    clock = CostWatch(session, warned=True, announce=False)  # the search's estimate of the time left, for on_step
    with session.accelerator.backend_settings():
        while not session.finished and finite:
            totals = start_epoch(session)
            for progress in train_one_epoch(session, totals):
                progress.eta_s = clock.after_step()
                if on_step:
                    on_step(progress)
            record = end_epoch(session, totals)
            finite = math.isfinite(record["train_loss"])
            if not finite:  # diverged: stop; the result says so
                record["heldout_acc"] = math.nan
            if out is not None:
                write_metrics(out, session.metrics)
            if on_epoch:
                on_epoch(record)
    metrics = session.metrics
    weights = sum(
        m.weight.numel() for m in model.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear))
    )
    result = DenseResult(
        heldout_acc=metrics[-1]["heldout_acc"] if metrics else math.nan,
        num_classes=spec.num_classes,
        weights=weights,
        steps=session.position.step,
        finite=finite,
        final_train_loss=metrics[-1]["train_loss"] if metrics else math.nan,
        seconds=time.perf_counter() - started,
        metrics=metrics,
        model=model.eval(),
    )
    if out is not None:
        document = {
            name: (None if isinstance(value, float) and not math.isfinite(value) else value)
            for name, value in vars(result).items()
            if name not in ("metrics", "model")
        }
        document["versions"] = {"maskforge": __version__, "torch": torch.__version__.split("+")[0]}
        atomic_write(out / RESULT_NAME, json.dumps(document, indent=2, sort_keys=True) + "\n")
    return result

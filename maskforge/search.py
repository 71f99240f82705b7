"""The edge-popup search loop: SGD on the scores only, cosine schedule, held-out evaluation each epoch.

`search(SearchConfig(...))` is what `maskforge search` runs; `resume(DIR)` is `maskforge search --resume
DIR`. Everything that decides the result is a pure function of the config: weights and scores come from
the seed, the batch order from (seed, epoch), augmentation from (seed, epoch, batch). So on CPU the same
arguments give a byte-identical artifact, and a search resumed from its checkpoint gives the artifact
the uninterrupted search would have given, byte for byte.

Scale (docs/SCALE.md):

* GPU: weights, scores and masks live on the device; bf16 autocast; channels_last for conv nets; uint8
  batches are copied (pinned, non-blocking, one batch ahead) and normalized/augmented on the device;
  optional `torch.compile`.
* torchrun: DistributedDataParallel over the scores. `batch_size` is the GLOBAL batch (each of N processes
  takes batch_size / N, which must divide evenly) and `lr` belongs to that global batch, so the same
  arguments describe the same optimization on 1 or N processes: step s of every run sees the same examples.
  Batch-norm running statistics are averaged over processes after every step; the held-out evaluation is
  sharded; rank 0 alone writes files and draws progress; at the end every rank's masks are compared.
* Checkpoints (maskforge.checkpoint) at every epoch end and every `checkpoint_every` steps.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import __version__, archs, distributed, regen
from .artifact import Artifact, build_artifact, pack_mask, save_artifact
from .checkpoint import CHECKPOINT_NAME, Checkpoint, capture, check_compatible, load_checkpoint, restore
from .checkpoint import read_position, save_checkpoint
from .data import DataSplits, InMemoryImages, augment_batch, iterate_batches, load_data, normalize, num_batches
from .distributed import World
from .errors import MaskforgeError
from .fileio import atomic_write, ensure_writable_dir
from .layers import batchnorm_modules, masked_modules

ARTIFACT_NAME = "artifact.safetensors"
METRICS_NAME = "metrics.jsonl"
CONFIG_NAME = "config.json"

#: Options that `--resume` may change: they do not change what the search computes.
RESUME_OVERRIDABLE = ("workers", "checkpoint_every")
#: Fields of a metrics record that measure time (they differ between runs; nothing else may).
TIMING_FIELDS = ("images_per_s", "epoch_seconds")
#: Test hook: a folder where every rank writes the digest of its final masks (`masks-rank<r>.txt`).
DIGEST_DIR_ENV = "MASKFORGE_MASK_DIGEST_DIR"


@dataclass
class SearchConfig:
    """Every argument of a search.

    Defaults are the paper's CIFAR settings (section 4, appendix B), except label smoothing: we use the
    paper's ImageNet value 0.1 everywhere, because on the small demo set it narrows the train/held-out
    gap (conv4 k=0.5: 97.0 % -> 97.5 % held-out; see BENCHMARKS.md). Pass 0 for the CIFAR recipe.
    """

    arch: str = "conv4"
    k: float = 0.5                   # fraction of weights kept in every layer
    data: str = "mnist5k"            # built-in demo set, or a CIFAR-10 / MNIST / image folder
    epochs: int = 10
    max_steps: int | None = None     # stop after this many optimizer steps (smoke runs)
    batch_size: int = 128            # GLOBAL batch: under torchrun each of N processes takes batch_size / N
    lr: float = 0.1                  # for the global batch; the number of processes does not change it
    momentum: float = 0.9
    weight_decay: float = 1e-4       # on the scores (they are the only parameters)
    label_smoothing: float = 0.1     # the paper's ImageNet value (CIFAR recipe: 0)
    warmup_epochs: int = 0           # linear warm-up before the cosine decay
    seed: int = 0
    init: str = "signed_constant"    # weight distribution, see regen.DISTRIBUTIONS
    scale_fan: bool = False          # sigma = sqrt(2 / (k * fan_in)) instead of sqrt(2 / fan_in)
    width: float = 1.0               # SWEEP-BRANCH MINIMAL EDIT: width multiplier of the hidden layers (arch arg)
    device: str = "auto"             # auto | cpu | cuda (under torchrun: cuda:LOCAL_RANK)
    workers: int | None = None       # data-loader processes for image folders; None: min(8, cores / procs)
    image_size: int | None = None    # image folders only: resize to this side
    compile: bool = False            # torch.compile the model (pays off on GPU for long searches)
    checkpoint_every: int | None = None  # also checkpoint every N optimizer steps (always at epoch ends)
    out: str = "runs/search"

    def validate(self) -> None:
        _check_types(self)
        archs.get_arch(self.arch)
        archs.check_width(self.width, self.arch)  # SWEEP-BRANCH MINIMAL EDIT
        if not 0.0 < self.k <= 1.0:
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
                  (self.seed >= 0, "seed must be a non-negative integer"),
                  (self.device in ("auto", "cpu", "cuda"), "device must be auto, cpu or cuda"),
                  (self.workers is None or self.workers >= 0, "workers must be non-negative"),
                  (self.checkpoint_every is None or self.checkpoint_every >= 1,
                   "checkpoint-every must be at least 1")]
        for ok, message in checks:
            if not ok:
                raise MaskforgeError(message)

    @classmethod
    def from_dict(cls, values: Any, label: str = "config") -> "SearchConfig":
        """The config recorded in a run folder (`config.json`), checked field by field."""
        if not isinstance(values, Mapping):
            raise MaskforgeError(f"{label} is not a JSON object")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise MaskforgeError(f"{label} has unknown field(s) {unknown}")
        config = cls(**values)
        try:
            config.validate()
        except MaskforgeError as exc:
            raise MaskforgeError(f"{label}: {exc}") from None
        return config


_FIELD_TYPES: dict[str, tuple] = {
    "arch": (str,), "k": (int, float), "data": (str,), "epochs": (int,), "max_steps": (int, type(None)),
    "batch_size": (int,), "lr": (int, float), "momentum": (int, float), "weight_decay": (int, float),
    "label_smoothing": (int, float), "warmup_epochs": (int,), "seed": (int,), "init": (str,),
    "scale_fan": (bool,), "width": (int, float), "device": (str,), "workers": (int, type(None)), "image_size": (int, type(None)),
    "compile": (bool,), "checkpoint_every": (int, type(None)), "out": (str,),
}


def _check_types(config: SearchConfig) -> None:
    for name, types in _FIELD_TYPES.items():
        value = getattr(config, name)
        is_bool = isinstance(value, bool)
        if not isinstance(value, types) or (is_bool and bool not in types):
            raise MaskforgeError(f"{name.replace('_', '-')} has the wrong type: {value!r}")
        if isinstance(value, float) and not math.isfinite(value):
            raise MaskforgeError(f"{name.replace('_', '-')} must be finite, got {value!r}")


@dataclass
class SearchResult:
    artifact: Artifact
    artifact_path: Path
    metrics: list[dict] = field(default_factory=list)
    rank: int = 0                    # under torchrun: this process's rank (only rank 0 wrote the files)

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
                      batch_size: int = 256, workers: int = 0, *, world: World | None = None
                      ) -> tuple[float, float]:
    """(loss, accuracy) of `model` on every example of `dataset` once.

    Under torchrun (`world`) each rank evaluates every world_size-th example and the sums are added.
    """
    world = world or World()
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, correct, examples
    batches = iterate_batches(_shard(dataset, world), batch_size, shuffle=False, workers=workers,
                              pin_memory=device.type == "cuda")
    with torch.no_grad(), _autocast(device):
        for images, labels in _on_device(batches, device):
            logits = model(_normalize(images, splits, _uses_conv(model) and device.type == "cuda")).float()
            sums[0] += F.cross_entropy(logits, labels, reduction="sum").double()
            sums[1] += (logits.argmax(1) == labels).sum()
            sums[2] += labels.numel()
    loss_sum, correct, total = distributed.sum_over_ranks(sums.tolist(), world)
    return loss_sum / max(1, total), correct / max(1, total)


def _shard(dataset, world: World):
    if not world.is_distributed:
        return dataset
    if isinstance(dataset, InMemoryImages):
        return InMemoryImages(dataset.images[world.rank::world.world_size],
                              dataset.labels[world.rank::world.world_size])
    return torch.utils.data.Subset(dataset, range(world.rank, len(dataset), world.world_size))


def _to_device(images: torch.Tensor, labels: torch.Tensor, splits: DataSplits, device: torch.device):
    """Copy a uint8 batch to `device` and normalize it there (channels_last for image batches on CUDA)."""
    images = images.to(device, non_blocking=True)
    return _normalize(images, splits, device.type == "cuda"), labels.to(device, non_blocking=True)


def _normalize(images: torch.Tensor, splits: DataSplits, channels_last: bool) -> torch.Tensor:
    # Normalization happens on the device: the loader ships compact uint8 images.
    x = normalize(images, splits.spec)
    if channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def _on_device(batches: Iterable, device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Batches on `device`. On CUDA the (pinned, non-blocking) copy of the next batch is issued before the
    current one is handed out, so the host prepares batch i+1 while the GPU still works on batch i."""
    iterator = iter(batches)
    try:
        if device.type != "cuda":
            yield from iterator
            return
        pending = None
        for images, labels in iterator:
            ready = (images.to(device, non_blocking=True), labels.to(device, non_blocking=True))
            if pending is not None:
                yield pending
            pending = ready
        if pending is not None:
            yield pending
    finally:
        close = getattr(iterator, "close", None)
        if close is not None:
            close()  # stops data-loader workers now, not at some later garbage collection


def _autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def _uses_conv(model: nn.Module) -> bool:
    return any(p.dim() == 4 for p in model.parameters())


def prepare(config: SearchConfig) -> tuple[DataSplits, nn.Module, dict]:
    """Validate the config, load the data and build the seeded model (nothing is written)."""
    config.validate()
    splits = load_data(config.data, image_size=config.image_size)
    spec = splits.spec
    args = archs.arch_args(spec.channels, spec.num_classes, (spec.height, spec.width),
                           config.width)  # SWEEP-BRANCH MINIMAL EDIT
    model = archs.create_model(config.arch, **args, k=config.k, seed=config.seed, init=config.init,
                               scale_fan=config.scale_fan)
    return splits, model, args


# --- entry points ----------------------------------------------------------------------------------------

def search(config: SearchConfig, *, progress: bool = True,
           on_epoch: Callable[[dict], None] | None = None) -> SearchResult:
    """Run edge-popup and write `<out>/artifact.safetensors`, `metrics.jsonl`, `config.json` and
    `checkpoint.safetensors`. Under torchrun, every process calls this; rank 0 writes the files.

    >>> from maskforge import SearchConfig, search
    >>> result = search(SearchConfig(arch="fc", k=0.5, epochs=1, out="runs/fc"))   # doctest: +SKIP
    >>> round(result.heldout_acc, 2)                                                # doctest: +SKIP
    0.9
    """
    config.validate()
    world = distributed.detect()
    _check_world(config, world)
    return _run(world, lambda: _plan_fresh(config), progress, on_epoch)


def resume(run_dir: str | os.PathLike, overrides: Mapping[str, Any] | None = None, *, progress: bool = True,
           on_epoch: Callable[[dict], None] | None = None) -> SearchResult:
    """Continue the search in `run_dir` from its checkpoint, with the arguments recorded in its config.json.

    `overrides` are options given again (e.g. on the command line): those in `RESUME_OVERRIDABLE` replace
    the recorded ones, any other must equal the recorded value or the call fails before anything is
    written. The resumed search ends with the artifact the uninterrupted one would have written.

    >>> result = resume("runs/fc", {"workers": 4})                                   # doctest: +SKIP
    """
    world = distributed.detect()
    return _run(world, lambda: _plan_resume(Path(run_dir), dict(overrides or {}), world), progress, on_epoch)


def read_run_config(run_dir: str | os.PathLike) -> SearchConfig:
    """The `SearchConfig` recorded in `run_dir/config.json`."""
    path = Path(run_dir) / CONFIG_NAME
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MaskforgeError(f"{path} is missing: {run_dir} is not a search run folder") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise MaskforgeError(f"cannot read {path}: {exc}") from None
    return SearchConfig.from_dict(values, str(path))


def _check_world(config: SearchConfig, world: World) -> None:
    if config.batch_size % world.world_size:
        up = -(-config.batch_size // world.world_size) * world.world_size
        raise MaskforgeError(f"--batch-size {config.batch_size} is the global batch and must be a multiple of "
                             f"the number of processes ({world.world_size}), e.g. --batch-size {up}")


# --- planning: rank 0 reads and validates, every rank gets the verdict ------------------------------------

@dataclass
class _Plan:
    config: SearchConfig
    checkpoint: Checkpoint | None = None


def _plan_fresh(config: SearchConfig) -> _Plan:
    resolve_device(config.device)
    position = read_position(Path(config.out) / CHECKPOINT_NAME)
    if position is not None and position["step"] < position["total_steps"]:
        # Starting over would overwrite an interrupted search that could still be continued.
        raise MaskforgeError(f"{config.out} holds an unfinished search (checkpoint at step {position['step']} of "
                             f"{position['total_steps']}): continue it with --resume {config.out}, or choose "
                             f"another --out (or delete the folder) to start a new one")
    return _Plan(config)


def _plan_resume(run: Path, overrides: dict, world: World) -> _Plan:
    if not run.is_dir():
        raise MaskforgeError(f"--resume {run}: no such run folder")
    recorded = read_run_config(run)
    values = asdict(recorded)
    conflicts = []
    for key, value in overrides.items():
        if key not in values:
            raise MaskforgeError(f"unknown search option {key!r}")
        flag = "--" + key.replace("_", "-")
        if key == "out":
            if Path(value).resolve() != run.resolve():
                conflicts.append(f"{flag} {value} (the run folder is {run})")
        elif key in RESUME_OVERRIDABLE:
            values[key] = value
        elif value != values[key]:
            conflicts.append(f"{flag} {value} (recorded: {values[key]})")
    if conflicts:
        raise MaskforgeError(f"--resume {run}: {'; '.join(conflicts)} conflict with the arguments recorded in "
                             f"{run / CONFIG_NAME}; leave them out to continue with the recorded ones")
    values["out"] = str(run)
    config = SearchConfig.from_dict(values, f"resume of {run}")
    resolve_device(config.device)
    _check_world(config, world)
    if not os.access(run, os.W_OK | os.X_OK):
        raise MaskforgeError(f"run folder {run} is not writable")

    path = run / CHECKPOINT_NAME
    checkpoint = load_checkpoint(path)
    check_compatible(checkpoint, _identity(config), f"checkpoint {path}")
    recorded_config = checkpoint.document["config"]
    differing = sorted(key for key in set(values) | set(recorded_config)
                       if key not in RESUME_OVERRIDABLE + ("out",) and recorded_config.get(key) != values.get(key))
    if differing:
        raise MaskforgeError(f"checkpoint {path} was written by a search with other arguments than "
                             f"{run / CONFIG_NAME} records (differing: {', '.join(differing)})")
    written_by = checkpoint.document["world_size"]
    if written_by != world.world_size:
        raise MaskforgeError(f"checkpoint {path} was written by {written_by} process(es); resume it with "
                             f"{written_by} (now {world.world_size}) so the batch order continues exactly")
    return _Plan(config, checkpoint)


def _identity(config: SearchConfig, arch_args: dict | None = None) -> dict:
    identity = {"arch": config.arch, "k": float(config.k), "seed": config.seed, "init": config.init,
                "scale_fan": config.scale_fan}
    if arch_args is not None:
        identity["arch_args"] = arch_args
    return identity


def _on_main(fn: Callable[[], Any], world: World, what: str = "") -> Any:
    """Run `fn` on rank 0 only and give every rank its result, or make every rank raise its error.

    A `MaskforgeError` on rank 0 becomes the same `MaskforgeError` everywhere (so all ranks exit 2
    together); any other failure re-raises on rank 0 and becomes a RuntimeError on the others.
    """
    if not world.is_distributed:
        return fn()
    message = None
    if world.is_main:
        try:
            message = ("ok", fn())
        except MaskforgeError as exc:
            message = ("error", str(exc))
        except BaseException as exc:
            distributed.broadcast_object(("crash", f"{type(exc).__name__}: {exc}"), world)
            raise
    kind, payload = distributed.broadcast_object(message, world)
    if kind == "error":
        raise MaskforgeError(payload)
    if kind == "crash":
        raise RuntimeError(f"rank 0 failed{what}: {payload}")
    return payload


def _agree(plan_fn: Callable[[], _Plan], world: World) -> _Plan:
    """Run `plan_fn` on rank 0 and give every rank its config (and checkpoint document), or its error."""
    plans: list[_Plan] = []

    def plan_on_main():
        plan = plan_fn()
        plans.append(plan)
        ckpt = plan.checkpoint
        return (asdict(plan.config), ckpt.document if ckpt else None, sorted(ckpt.tensors) if ckpt else None)

    config, document, names = _on_main(plan_on_main, world, " while preparing the search")
    if plans:  # rank 0 (or a single process) keeps its own plan, tensors included
        return plans[0]
    # Other ranks know the checkpoint's document and tensor names; the tensors come by broadcast.
    return _Plan(SearchConfig(**config), Checkpoint(document, dict.fromkeys(names)) if document else None)


# --- the search ------------------------------------------------------------------------------------------

def _run(world: World, plan_fn: Callable[[], _Plan], progress: bool,
         on_epoch: Callable[[dict], None] | None) -> SearchResult:
    with distributed.process_group(world):
        plan = _agree(plan_fn, world)
        return _search(plan.config, plan.checkpoint, world, progress, on_epoch)


def _search(config: SearchConfig, checkpoint: Checkpoint | None, world: World, progress: bool,
            on_epoch: Callable[[dict], None] | None) -> SearchResult:
    main = world.is_main
    device = distributed.local_device(world, resolve_device(config.device).type)
    cuda = device.type == "cuda"
    splits, model, args = prepare(config)
    identity = _identity(config, args)
    if checkpoint is not None and checkpoint.identity["arch_args"] != args:
        raise MaskforgeError(f"the data {config.data} now gives a network with {args}, but the checkpoint "
                             f"was written for {checkpoint.identity['arch_args']}")
    out = Path(config.out)
    if checkpoint is None:
        # Only now, once the data loaded and the network built: a bad argument leaves no folder behind.
        _on_main(lambda: atomic_write(ensure_writable_dir(out) / CONFIG_NAME,
                                      json.dumps(asdict(config), indent=2, sort_keys=True) + "\n"), world)

    model.to(device)
    channels_last = cuda and _uses_conv(model)
    if cuda:
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 matmuls outside autocast (none in the hot path)
        if channels_last:
            model.to(memory_format=torch.channels_last)
    scores = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(scores, lr=config.lr, momentum=config.momentum,
                                weight_decay=config.weight_decay)

    local_batch = config.batch_size // world.world_size
    drop_last = len(splits.train) > config.batch_size
    steps_per_epoch = num_batches(len(splits.train), local_batch, drop_last=drop_last,
                                  world_size=world.world_size)
    total_steps = steps_per_epoch * config.epochs
    if config.max_steps is not None:
        total_steps = min(total_steps, config.max_steps)
    warmup_steps = config.warmup_epochs * steps_per_epoch

    start_epoch, start_batch, step = 0, 0, 0
    metrics: list[dict] = []
    sums: list[float] = [0.0, 0, 0]  # this rank's train loss sum, correct, seen in the current epoch
    if checkpoint is not None:
        position = checkpoint.position
        if (position["steps_per_epoch"], position["total_steps"]) != (steps_per_epoch, total_steps):
            raise MaskforgeError(f"the checkpoint expects {position['steps_per_epoch']} steps per epoch and "
                                 f"{position['total_steps']} in all, this data gives {steps_per_epoch} and "
                                 f"{total_steps}")
        _restore_everywhere(checkpoint, model, optimizer, world)
        start_epoch, start_batch, step = position["epoch"], position["batch_in_epoch"], position["step"]
        metrics = [dict(record) for record in checkpoint.document["metrics"]]
        sums = list(checkpoint.document["train_sums"][world.rank])

    bn_stats = [t for bn in batchnorm_modules(model).values() for t in (bn.running_mean, bn.running_var)
                if t is not None]
    train_model: nn.Module = model
    if world.is_distributed:
        # The weights are non-persistent buffers regenerated identically on every rank: keep DDP from
        # broadcasting them (68 M floats for a WRN-50). BN statistics are averaged after each step instead
        # of broadcast from rank 0 each forward, so they see every rank's batches.
        model._ddp_params_and_buffers_to_ignore = [f"{name}.weight" for name in masked_modules(model)]
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if cuda else None, **_no_forward_buffer_sync())
    if config.compile:
        train_model = torch.compile(train_model)
    workers = _workers(config, world)

    def save(epoch: int, batch_in_epoch: int, local_sums: list) -> None:
        # Collective: every rank contributes its running sums; rank 0 writes.
        rows = distributed.gather_rows(local_sums, world)
        if not main:
            return
        document = {"identity": identity, "config": asdict(config), "world_size": world.world_size,
                    "position": {"epoch": epoch, "batch_in_epoch": batch_in_epoch, "step": step,
                                 "steps_per_epoch": steps_per_epoch, "total_steps": total_steps},
                    "train_sums": [[row[0], int(row[1]), int(row[2])] for row in rows],
                    "metrics": metrics,
                    "versions": {"maskforge": __version__, "torch": torch.__version__.split("+")[0]}}
        save_checkpoint(capture(model, optimizer, document), out / CHECKPOINT_NAME)

    with _ProgressBar(enabled=progress and main, total=total_steps, completed=step) as bar:
        for epoch in range(start_epoch, config.epochs):
            if step >= total_steps:
                break
            first = start_batch if epoch == start_epoch else 0
            if epoch != start_epoch:
                sums = [0.0, 0, 0]
            model.train()
            loss_sum = torch.tensor(float(sums[0]), dtype=torch.float64, device=device)
            correct = torch.tensor(int(sums[1]), dtype=torch.int64, device=device)
            seen, seen_here, started = int(sums[2]), 0, time.perf_counter()
            batches = _on_device(iterate_batches(
                splits.train, local_batch, shuffle=True, seed=config.seed, epoch=epoch, drop_last=drop_last,
                start_batch=first, rank=world.rank, world_size=world.world_size, workers=workers,
                pin_memory=cuda), device)
            for batch_index, (images, labels) in enumerate(batches, start=first):
                if step >= total_steps:
                    break
                if splits.augment:
                    # A generator on the batch's device: on CUDA the random draws need no host round trip.
                    generator = torch.Generator(device=images.device)
                    generator.manual_seed(_augment_seed(config.seed, epoch, batch_index, world))
                    images = augment_batch(images, generator)
                x = _normalize(images, splits, channels_last)
                for group in optimizer.param_groups:
                    group["lr"] = lr_at(step, total_steps, warmup_steps, config.lr)
                with _autocast(device):
                    logits = train_model(x)
                    loss = F.cross_entropy(logits.float(), labels, label_smoothing=config.label_smoothing)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                if world.is_distributed:
                    with torch.no_grad():
                        distributed.average_tensors_(bn_stats, world)
                step += 1
                n = labels.numel()
                seen, seen_here = seen + n, seen_here + n
                # Accumulated on the device: no host sync per step.
                loss_sum += loss.detach().double() * n
                correct += (logits.argmax(1) == labels).sum()
                if bar.enabled and (not cuda or step % 20 == 0 or step == total_steps):
                    elapsed = max(time.perf_counter() - started, 1e-9)
                    bar.update(step, epoch=epoch + 1, epochs=config.epochs, loss=float(loss_sum) / seen,
                               acc=int(correct) / seen, images_per_s=seen_here * world.world_size / elapsed)
                if (config.checkpoint_every and step % config.checkpoint_every == 0
                        and batch_index + 1 < steps_per_epoch and step < total_steps):
                    save(epoch, batch_index + 1, [float(loss_sum), int(correct), seen])
            batches.close()
            train_time = time.perf_counter() - started
            loss_total, correct_total, seen_total, here_total = distributed.sum_over_ranks(
                [float(loss_sum), int(correct), seen, seen_here], world)
            heldout_loss, heldout_acc = evaluate_accuracy(model, splits.heldout, splits, device,
                                                          workers=workers, world=world)
            record = {"epoch": epoch + 1, "step": step,
                      "lr": lr_at(step - 1, total_steps, warmup_steps, config.lr) if step else config.lr,
                      "train_loss": loss_total / max(1, seen_total),
                      "train_acc": correct_total / max(1, seen_total),
                      "heldout_loss": heldout_loss, "heldout_acc": heldout_acc,
                      "images_per_s": here_total / max(train_time, 1e-9), "epoch_seconds": train_time}
            metrics.append(record)
            if main:
                _write_metrics(out, metrics)
            bar.log(f"epoch {epoch + 1}/{config.epochs}  loss {record['train_loss']:.4f}  "
                    f"held-out acc {heldout_acc:.2%}  {record['images_per_s']:.0f} img/s")
            save(epoch + 1, 0, [0.0, 0, 0])
            if on_epoch and main:
                on_epoch(record)

    if main and metrics:
        # Idempotent; repairs the file if a kill fell between an epoch's metrics and its checkpoint.
        _write_metrics(out, metrics)
    digest = _mask_digest(model)
    distributed.check_identical(digest, "the searched masks", world)
    _write_debug_digest(digest, world)
    model.cpu()
    if channels_last:
        model.to(memory_format=torch.contiguous_format)
    provenance = {"maskforge_version": __version__, "torch_version": torch.__version__.split("+")[0],
                  "data": splits.name, "data_kind": splits.kind, "epochs": config.epochs, "steps": step,
                  "batch_size": config.batch_size, "processes": world.world_size, "lr": config.lr,
                  "heldout_acc": metrics[-1]["heldout_acc"] if metrics else None,
                  "heldout_examples": len(splits.heldout)}
    artifact = build_artifact(model, arch=config.arch, arch_args=args, spec=splits.spec, seed=config.seed,
                              init=config.init, scale_fan=config.scale_fan, k=float(config.k),
                              provenance=provenance)
    path = out / ARTIFACT_NAME
    if main:
        save_artifact(artifact, path)
    distributed.barrier(world)  # no rank returns before the artifact exists
    return SearchResult(artifact, path, metrics, rank=world.rank)


def _write_metrics(out: Path, metrics: list[dict]) -> None:
    atomic_write(out / METRICS_NAME, "".join(json.dumps(m, sort_keys=True) + "\n" for m in metrics))


def _restore_everywhere(checkpoint: Checkpoint, model: nn.Module, optimizer: torch.optim.Optimizer,
                        world: World) -> None:
    """Rank 0 loads the checkpoint's tensors; every other rank receives them by broadcast."""
    if world.is_main:
        restore(checkpoint, model, optimizer)
    if not world.is_distributed:
        return
    has_momentum = any(name.startswith("momentum/") for name in checkpoint.tensors)
    state = []
    for param in model.parameters():
        state.append(param.data)
        if has_momentum:
            buffer = optimizer.state[param].get("momentum_buffer")
            if buffer is None:
                buffer = optimizer.state[param]["momentum_buffer"] = torch.zeros_like(param)
            state.append(buffer)
    for bn in batchnorm_modules(model).values():
        state += [t for t in (bn.running_mean, bn.running_var, bn.num_batches_tracked) if t is not None]
    with torch.no_grad():
        distributed.broadcast_tensors(state, world)
    for layer in masked_modules(model).values():
        layer._mask_cache = None


def _no_forward_buffer_sync() -> dict:
    # Newer torch renamed the flag (broadcast_buffers is deprecated); either way buffers sync once at init.
    parameters = inspect.signature(nn.parallel.DistributedDataParallel.__init__).parameters
    return {"forward_sync_buffers": False} if "forward_sync_buffers" in parameters else {"broadcast_buffers": False}


def _workers(config: SearchConfig, world: World) -> int:
    if config.workers is not None:
        return config.workers
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 2
    return max(1, min(8, cores // world.local_world_size))


def _mask_digest(model: nn.Module) -> bytes:
    digest = hashlib.sha256()
    for name, layer in masked_modules(model).items():
        digest.update(name.encode("utf-8"))
        digest.update(pack_mask(layer.mask()).tobytes())
    return digest.digest()


def _write_debug_digest(digest: bytes, world: World) -> None:
    folder = os.environ.get(DIGEST_DIR_ENV)
    if folder:
        atomic_write(Path(folder) / f"masks-rank{world.rank}.txt", digest.hex() + "\n")


def _augment_seed(seed: int, epoch: int, batch_index: int, world: World) -> int:
    # Ranks draw different crops/flips for their different images (one process: the original formula).
    if world.is_distributed:
        return _mix(seed, epoch, batch_index, world.rank)
    return _mix(seed, epoch, batch_index)


def _mix(*values: int) -> int:
    """A 63-bit seed from several integers (for per-step generators), stable across runs."""
    result = 0
    for value in values:
        result = (result * 1_000_003 + int(value) + 1) % (2 ** 63)
    return result


class _ProgressBar:
    """A rich progress bar with loss, accuracy and images/s; a no-op when disabled."""

    def __init__(self, enabled: bool, total: int, completed: int = 0) -> None:
        self.enabled, self.total, self.completed = enabled, total, completed
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
            self._task = self._progress.add_task("search", total=self.total, completed=self.completed, epoch=0,
                                                 epochs=0, loss=0.0, acc=0.0, images_per_s=0.0)
        return self

    def update(self, completed: int, **fields) -> None:
        if self._progress is not None:
            self._progress.update(self._task, completed=completed, **fields)

    def log(self, message: str) -> None:
        if self._progress is not None:
            self._progress.console.print(message)

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)

"""The run folder: what a search writes, each file by one function (rank 0 writes, the others wait).

* `open_run_folder`: before the first step: move aside or clear what the plan says, then `config.json`;
* `write_metrics` (maskforge/metricfiles.py): `metrics.jsonl` and `metrics.csv`, one record per finished epoch;
* `save_checkpoint`: `checkpoint.safetensors` (collective: every rank contributes its running sums);
* `finalize_artifact`: `artifact.safetensors`, built from the searched model on every rank; then the
  checkpoint is removed unless `keep_checkpoint`.

Every write is atomic (maskforge.fileio), and its success or failure is every rank's (a full disk on
rank 0 fails every rank with the same message). `read_run_config` reads `config.json` back for `--resume`.
The file names and the folder's states are in folders.py.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from .. import __version__, distributed
from ..artifact import Artifact, build_artifact, pack_mask, save_artifact
from ..checkpoint import CHECKPOINT_NAME, capture
from ..checkpoint import save_checkpoint as write_checkpoint
from ..data import heldout_fingerprint
from ..distributed import World
from ..fileio import atomic_write
from ..layers import masked_modules
from ..schema import SearchConfig
from .folders import ARTIFACT_NAME, CONFIG_NAME, METRICS_CSV_NAME, METRICS_NAME, clear_records, read_run_config, retire
from ..metricfiles import write_metrics
from .setup import Session

#: Fields of a metrics record that measure time (they differ between runs; nothing else may).
TIMING_FIELDS = ("images_per_s", "epoch_seconds")

__all__ = [
    "ARTIFACT_NAME",
    "METRICS_NAME",
    "METRICS_CSV_NAME",
    "CONFIG_NAME",
    "CHECKPOINT_NAME",
    "TIMING_FIELDS",
    "read_run_config",
    "open_run_folder",
    "record_metrics",
    "save_checkpoint",
    "finalize_artifact",
    "identity",
]


def open_run_folder(
    config: SearchConfig, world: World, *, retire_except: tuple[str, ...] | None = None, clear: bool = False
) -> None:
    """Before the first step (rank 0; any rank's failure fails every rank): move the folder's previous
    files to previous-N/ except `retire_except` (None: move nothing), or `clear` the records of a search
    that never checkpointed; then write `config.json` (a resumed search records its new operational and
    extended fields)."""

    def write() -> None:
        folder = Path(config.out)
        if retire_except is not None:
            retire(folder, retire_except)
        if clear:
            clear_records(folder)
        atomic_write(folder / CONFIG_NAME, json.dumps(config.to_dict(), indent=2, sort_keys=True) + "\n")

    distributed.run_on_main(write, world)


def identity(config: SearchConfig, arch_args: dict | None = None) -> dict:
    """Which network a checkpoint's scores belong to (without `arch_args` when the data is not loaded)."""
    values = {
        "arch": config.arch,
        "k": float(config.k),
        "seed": config.seed,
        "init": config.init,
        "scale_fan": config.scale_fan,
        "topk": config.topk,
    }
    if arch_args is not None:
        values["arch_args"] = arch_args
    return values


def save_checkpoint(session: Session, epoch_sums: list) -> None:
    """Write the checkpoint at `session.position`. Collective: every rank contributes its running sums of
    the current epoch (`[loss_sum, correct, seen]`); rank 0 writes, and a failed write fails every rank."""
    rows = distributed.gather_rows(epoch_sums, session.world)
    distributed.run_on_main(lambda: _write_checkpoint(session, rows), session.world)


def _write_checkpoint(session: Session, rows: list) -> None:
    position = session.position
    document = {
        "identity": {**identity(session.config, session.arch_args), **session.builder},
        "config": session.config.to_dict(),
        "world_size": session.world.world_size,
        "position": {
            "epoch": position.epoch,
            "batch_in_epoch": position.batch_in_epoch,
            "step": position.step,
            "steps_per_epoch": session.steps_per_epoch,
            "total_steps": session.total_steps,
        },
        "train_sums": [[row[0], int(row[1]), int(row[2])] for row in rows],
        "metrics": session.metrics,
        "versions": {"maskforge": __version__, "torch": torch.__version__.split("+")[0]},
    }
    write_checkpoint(capture(session.model, session.optimizer, document), Path(session.config.out) / CHECKPOINT_NAME)


def record_metrics(session: Session) -> None:
    """`metrics.jsonl` and `metrics.csv` of the finished epochs (collective: rank 0 writes, all agree)."""
    distributed.run_on_main(lambda: write_metrics(session.config.out, session.metrics), session.world)


def mask_digest(model: torch.nn.Module) -> str:
    """SHA-256 (hex) of a model's masks: each layer's name, then its packed mask bytes, in layer order."""
    digest = hashlib.sha256()
    for name, layer in masked_modules(model).items():
        digest.update(name.encode("utf-8"))
        digest.update(pack_mask(layer.mask()).tobytes())
    return digest.hexdigest()


def finalize_artifact(session: Session) -> tuple[Artifact, Path, str]:
    """Build the artifact from the searched model on every rank, check that every rank holds the same
    masks, and write it (rank 0). Returns (artifact, its path, this rank's mask digest)."""
    config, world, model = session.config, session.world, session.model
    if session.metrics:
        # Idempotent; repairs the files if a kill fell between an epoch's metrics and its checkpoint.
        record_metrics(session)
    digest = mask_digest(model)
    distributed.check_identical(bytes.fromhex(digest), "the searched masks", world)
    model.cpu()
    if session.accelerator.channels_last:
        model.to(memory_format=torch.contiguous_format)
    artifact = build_artifact(
        model,
        arch=config.arch,
        arch_args=session.arch_args,
        spec=session.splits.spec,
        seed=config.seed,
        init=config.init,
        scale_fan=config.scale_fan,
        k=float(config.k),
        provenance=provenance(session),
        topk=config.topk,
        builder=session.builder,
    )
    path = Path(config.out) / ARTIFACT_NAME

    def write() -> None:
        save_artifact(artifact, path)
        if not config.keep_checkpoint:  # the artifact is the result; the checkpoint only served the search
            (Path(config.out) / CHECKPOINT_NAME).unlink(missing_ok=True)

    distributed.run_on_main(write, world)  # no rank returns before the artifact exists, or all fail
    return artifact, path, digest


def provenance(session: Session) -> dict:
    """How the artifact was made: versions, data, schedule and the computing choices (no timestamps)."""
    config, accelerator, metrics = session.config, session.accelerator, session.metrics
    return {
        "maskforge_version": __version__,
        "torch_version": torch.__version__.split("+")[0],
        "data": session.splits.name,
        "data_kind": session.splits.kind,
        "heldout_digest": heldout_fingerprint(session.splits),
        "epochs": config.epochs,
        "steps": session.position.step,
        "batch_size": config.batch_size,
        "processes": session.world.world_size,
        "lr": config.lr,
        "heldout_acc": metrics[-1]["heldout_acc"] if metrics else None,
        "heldout_examples": len(session.splits.heldout),
        **accelerator.provenance(),
    }

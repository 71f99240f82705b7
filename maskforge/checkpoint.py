"""The search checkpoint: everything a search needs to continue exactly where it stopped, as safetensors.

`DIR/checkpoint.safetensors` is written atomically (temporary file, fsync, rename) at the end of every
epoch and every `--checkpoint-every` optimizer steps; `maskforge search --resume DIR` continues from it.
No pickle: tensors are safetensors tensors and everything else is one JSON document.

Tensors (all in the model's logical shape, C order):

* `scores/<param>`    float32 — the scores, the only trained tensors (e.g. `scores/1.scores`);
* `momentum/<param>`  float32 — SGD momentum buffers (absent before the first step or with momentum 0);
* `bn/<module>.running_mean`, `.running_var` float32 and `.num_batches_tracked` int64 — batch norm;
* `rng/torch_cpu`     uint8 — torch's global CPU generator state (the search draws nothing from it: batch
  order and augmentation are keyed by (seed, epoch, batch); it is kept so that nothing can drift).

The weights are not stored: they are regenerated from the seed, as for the artifact.

The JSON document (metadata key `maskforge_checkpoint`) holds the format name/version, the run identity
(arch, arch args, k, seed, init, scale_fan), the full search config, the number of processes, the position
(`epoch` being run, `batch_in_epoch` = batches of it already done, global `step`, `steps_per_epoch`,
`total_steps`), each rank's running train-loss/accuracy sums of the current epoch, the metrics records of
the finished epochs, versions, and SHA-256 digests of every tensor and of the document itself. Loading
checks all of it; any problem is a `MaskforgeError` naming the file.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load as _st_load_bytes
from safetensors.torch import save_file as _st_save_file

from . import archs
from .digests import canonical_json, document_digest, is_int, tensor_digest
from .errors import MaskforgeError
from .fileio import atomic_path
from .layers import batchnorm_modules, masked_modules

CHECKPOINT_NAME = "checkpoint.safetensors"
FORMAT_NAME = "maskforge-checkpoint"
FORMAT_VERSION = 1
METADATA_KEY = "maskforge_checkpoint"
IDENTITY_KEYS = ("arch", "arch_args", "k", "seed", "init", "scale_fan")
_BN_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


@dataclass
class Checkpoint:
    """A checkpoint in memory: the JSON document and the named CPU tensors.

    >>> ckpt = load_checkpoint("runs/fc/checkpoint.safetensors")        # doctest: +SKIP
    >>> ckpt.document["position"]                                       # doctest: +SKIP
    {'batch_in_epoch': 4, 'epoch': 1, 'step': 35, 'steps_per_epoch': 31, 'total_steps': 62}
    """

    document: dict
    tensors: dict[str, torch.Tensor]

    @property
    def position(self) -> dict:
        return self.document["position"]

    @property
    def identity(self) -> dict:
        return self.document["identity"]


# --- capture / restore -----------------------------------------------------------------------------------

def capture(model: nn.Module, optimizer: torch.optim.Optimizer, document: dict) -> Checkpoint:
    """Copy the trainable state of `model` (unwrapped: no DDP/compile wrapper) and `optimizer` to the CPU."""
    tensors: dict[str, torch.Tensor] = {}
    for name, param in model.named_parameters():
        tensors[f"scores/{name}"] = _cpu(param)
        buffer = optimizer.state.get(param, {}).get("momentum_buffer")
        if buffer is not None:
            tensors[f"momentum/{name}"] = _cpu(buffer)
    for name, bn in batchnorm_modules(model).items():
        for stat in _BN_BUFFERS:
            value = getattr(bn, stat, None)
            if value is not None:
                tensors[f"bn/{name}.{stat}"] = _cpu(value)
    tensors["rng/torch_cpu"] = torch.get_rng_state().clone()
    return Checkpoint(dict(document), tensors)


def _cpu(tensor: torch.Tensor) -> torch.Tensor:
    # contiguous(): channels_last tensors are stored in their logical (C) order.
    return tensor.detach().to("cpu", copy=True).contiguous()


def restore(checkpoint: Checkpoint, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Load scores, momentum buffers, BN statistics and the CPU RNG state into `model` and `optimizer`.

    Call `check_compatible` first; this assumes every name and shape matches.
    """
    tensors = checkpoint.tensors
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(tensors[f"scores/{name}"])
            momentum = tensors.get(f"momentum/{name}")
            if momentum is not None:
                optimizer.state[param]["momentum_buffer"] = torch.zeros_like(param).copy_(momentum)
        for name, bn in batchnorm_modules(model).items():
            for stat in _BN_BUFFERS:
                value = getattr(bn, stat, None)
                if value is not None:
                    value.copy_(tensors[f"bn/{name}.{stat}"])
    for layer in masked_modules(model).values():
        layer._mask_cache = None  # copy_ bumps scores._version anyway; never trust a cache across a load
    torch.set_rng_state(tensors["rng/torch_cpu"])


def expected_tensors(model: nn.Module) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """name -> (shape, dtype) of every tensor a checkpoint of `model` must hold (momentum: may hold)."""
    expected = {}
    for name, param in model.named_parameters():
        expected[f"scores/{name}"] = (tuple(param.shape), torch.float32)
        expected[f"momentum/{name}"] = (tuple(param.shape), torch.float32)
    for name, bn in batchnorm_modules(model).items():
        for stat in _BN_BUFFERS:
            value = getattr(bn, stat, None)
            if value is not None:
                expected[f"bn/{name}.{stat}"] = (tuple(value.shape), value.dtype)
    return expected


def check_compatible(checkpoint: Checkpoint, identity: dict, label: str) -> None:
    """Raise unless `checkpoint` belongs to a network with this identity (arch, args, k, seed, init...).

    Keys missing from `identity` are not compared (a caller may not know the arch args before loading the
    data). Every tensor's name, shape and dtype is checked against the architecture the checkpoint names,
    built on the meta device.
    """
    recorded = checkpoint.identity
    differences = [f"{key} {recorded.get(key)!r} (this run: {identity[key]!r})" for key in IDENTITY_KEYS
                   if key in identity and recorded.get(key) != identity[key]]
    if differences:
        raise MaskforgeError(f"{label} was written by a different search: {'; '.join(differences)}")
    arch, args = recorded["arch"], recorded["arch_args"]
    if not isinstance(arch, str) or not isinstance(args, dict) or not isinstance(recorded["k"], (int, float)):
        raise MaskforgeError(f"{label} is corrupt: bad identity {recorded!r}")
    with torch.device("meta"):
        structure = archs.build_structure(arch, args, float(recorded["k"]))
    expected = expected_tensors(structure)
    names = set(checkpoint.tensors) - {"rng/torch_cpu"}
    missing = sorted(n for n in expected if n not in names and not n.startswith("momentum/"))
    extra = sorted(names - set(expected))
    if missing or extra:
        raise MaskforgeError(f"{label} does not match architecture {arch}: missing tensors "
                             f"{missing[:3]}, unexpected tensors {extra[:3]}")
    for name in sorted(names):
        shape, dtype = expected[name]
        tensor = checkpoint.tensors[name]
        if tuple(tensor.shape) != shape or tensor.dtype != dtype:
            raise MaskforgeError(f"{label}: tensor {name} is {list(tensor.shape)} {tensor.dtype}, architecture "
                                 f"{arch} needs {list(shape)} {dtype}")
    momenta = {n for n in names if n.startswith("momentum/")}
    if momenta and len(momenta) != sum(n.startswith("scores/") for n in expected):
        raise MaskforgeError(f"{label}: momentum buffers exist for some layers only")


# --- save / load -----------------------------------------------------------------------------------------

def save_checkpoint(checkpoint: Checkpoint, path: str | os.PathLike) -> Path:
    """Write atomically: a reader or a crash sees the previous checkpoint or this one, never a torn file."""
    document = {key: value for key, value in checkpoint.document.items() if key != "digests"}
    document["format"], document["format_version"] = FORMAT_NAME, FORMAT_VERSION
    tensors = {name: checkpoint.tensors[name] for name in sorted(checkpoint.tensors)}
    digests = {"tensors": {name: tensor_digest(t) for name, t in tensors.items()}}
    document["digests"] = digests
    # NaN is allowed here: a diverged search still checkpoints (its losses are NaN) and resumes the same way.
    digests["document"] = document_digest(document, allow_nan=True)
    checkpoint.document = document
    with atomic_path(path) as tmp:
        _st_save_file(tensors, str(tmp), metadata={METADATA_KEY: canonical_json(document, allow_nan=True)})
    return Path(path)


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Read and validate a checkpoint (header, JSON schema, version, digests); CPU tensors."""
    path = Path(path)
    label = f"checkpoint {path}"
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise MaskforgeError(f"no checkpoint at {path}: nothing to resume (a search writes one at the end "
                             f"of every epoch and every --checkpoint-every steps)") from None
    except IsADirectoryError:
        raise MaskforgeError(f"{path} is a folder, not a checkpoint file") from None
    except OSError as exc:
        raise MaskforgeError(f"cannot read {label}: {exc.strerror or exc}") from None
    document = _read_document(data, label)
    try:
        tensors = _st_load_bytes(data)
    except (SafetensorError, ValueError, TypeError, RuntimeError) as exc:
        raise MaskforgeError(f"{label} is corrupt ({' '.join(str(exc).split())})") from None
    _validate_document(document, label)
    if document_digest(document, allow_nan=True) != document["digests"]["document"]:
        raise MaskforgeError(f"{label} is corrupt: its metadata does not match its digest")
    recorded = document["digests"]["tensors"]
    if not isinstance(recorded, dict) or set(recorded) != set(tensors):
        raise MaskforgeError(f"{label} is corrupt: its tensors differ from the ones its metadata lists")
    for name, tensor in tensors.items():
        if tensor_digest(tensor) != recorded[name]:
            raise MaskforgeError(f"{label} is corrupt: tensor {name} does not match its digest")
    if "rng/torch_cpu" not in tensors or tensors["rng/torch_cpu"].dtype != torch.uint8:
        raise MaskforgeError(f"{label} is corrupt: the RNG state is missing")
    return Checkpoint(document, tensors)


def read_position(path: str | os.PathLike) -> dict | None:
    """The `position` of the checkpoint at `path` from its header alone (cheap; None if unreadable).

    For progress polling and tests; `load_checkpoint` is the validating reader.
    """
    try:
        with open(path, "rb") as handle:
            size = int.from_bytes(handle.read(8), "little")
            if size > 100_000_000:
                return None
            header = json.loads(handle.read(size))
        position = json.loads(header["__metadata__"][METADATA_KEY])["position"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    keys = ("epoch", "batch_in_epoch", "step", "steps_per_epoch", "total_steps")
    if not isinstance(position, dict) or not all(is_int(position.get(key)) for key in keys):
        return None
    return position


def _read_document(data: bytes, label: str) -> dict:
    if len(data) < 8:
        raise MaskforgeError(f"{label} is corrupt or not a checkpoint (only {len(data)} bytes)")
    size = int.from_bytes(data[:8], "little")
    if size > len(data) - 8 or size > 100_000_000:
        raise MaskforgeError(f"{label} is corrupt or not a checkpoint (truncated or not safetensors)")
    try:
        header = json.loads(data[8:8 + size])
        text = header["__metadata__"][METADATA_KEY]
    except (UnicodeDecodeError, ValueError, KeyError, TypeError):
        raise MaskforgeError(f"{label} is corrupt or not a maskforge checkpoint (no '{METADATA_KEY}' "
                             f"metadata)") from None
    try:
        document = json.loads(text)
    except (TypeError, ValueError):
        raise MaskforgeError(f"{label} is corrupt: its metadata is not valid JSON") from None
    if not isinstance(document, dict):
        raise MaskforgeError(f"{label} is corrupt: its metadata is not a JSON object")
    return document


def _validate_document(doc: dict, label: str) -> None:
    def require(ok: bool, message: str) -> None:
        if not ok:
            raise MaskforgeError(f"{label}: {message}")

    require(doc.get("format") == FORMAT_NAME, f"format is {doc.get('format')!r}, not {FORMAT_NAME!r}")
    version = doc.get("format_version")
    require(is_int(version), "format_version is missing")
    if version > FORMAT_VERSION:
        raise MaskforgeError(f"{label} has format version {version}, newer than this maskforge reads "
                             f"({FORMAT_VERSION}); upgrade maskforge")
    require(version == FORMAT_VERSION, f"unsupported format version {version}")
    identity = doc.get("identity")
    require(isinstance(identity, dict) and all(key in identity for key in IDENTITY_KEYS),
            f"identity must hold {', '.join(IDENTITY_KEYS)}")
    require(isinstance(doc.get("config"), dict), "config is missing")
    world_size = doc.get("world_size")
    require(is_int(world_size) and world_size >= 1, "world_size is missing")
    position = doc.get("position")
    keys = ("epoch", "batch_in_epoch", "step", "steps_per_epoch", "total_steps")
    require(isinstance(position, dict) and all(is_int(position.get(k)) and position[k] >= 0 for k in keys),
            f"position must hold non-negative integers {', '.join(keys)}")
    require(position["batch_in_epoch"] <= position["steps_per_epoch"] and position["step"]
            <= position["total_steps"], "position is inconsistent")
    sums = doc.get("train_sums")
    require(isinstance(sums, list) and len(sums) == world_size
            and all(isinstance(row, list) and len(row) == 3 and all(isinstance(v, (int, float)) for v in row)
                    for row in sums), "train_sums must hold [loss_sum, correct, seen] for each process")
    metrics = doc.get("metrics")
    require(isinstance(metrics, list) and all(isinstance(m, dict) for m in metrics), "metrics is missing")
    digests = doc.get("digests")
    require(isinstance(digests, dict) and isinstance(digests.get("document"), str)
            and isinstance(digests.get("tensors"), dict), "digests are missing")

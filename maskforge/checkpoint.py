"""The search checkpoint: everything a search needs to continue exactly where it stopped, as safetensors.

`DIR/checkpoint.safetensors` is written atomically (temporary file, fsync, rename) at the end of every
epoch and every `checkpoint_every` optimizer steps; `maskforge search --resume DIR` continues from it.
No pickle: tensors are safetensors tensors and everything else is one JSON document
(`maskforge.schema.CheckpointDocument`), sealed by `maskforge.container` like an artifact's.

Tensors (all in the model's logical shape, C order):

* `scores/<param>`    float32 — the scores, the only trained tensors (e.g. `scores/1.scores`);
* `momentum/<param>`  float32 — SGD momentum buffers (absent before the first step or with momentum 0);
* `bn/<module>.running_mean`, `.running_var` float32 and `.num_batches_tracked` int64 — batch norm;
* `rng/torch_cpu`     uint8 — torch's global CPU generator state (the search draws nothing from it: batch
  order and augmentation are keyed by (seed, epoch, batch); it is kept so that nothing can drift).

The weights are not stored: they are regenerated from the seed, as for the artifact.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from . import archs, container, convert
from .errors import MaskforgeError
from .layers import batchnorm_modules, masked_modules
from .schema import CheckpointDocument, Position, dump, parse, parse_checkpoint_document
from .runfiles import CHECKPOINT_NAME  # noqa: F401  (re-exported; the name belongs to the run folder)
from .schema.checkpoint import FORMAT_NAME, FORMAT_VERSION, METADATA_KEY, Identity

KIND = "maskforge checkpoint"
BN_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")
RNG_STATE = "rng/torch_cpu"


@dataclass
class Checkpoint:
    """A checkpoint in memory: the JSON document and the named CPU tensors.

    >>> ckpt = load_checkpoint("runs/fc/checkpoint.safetensors")        # doctest: +SKIP
    >>> ckpt.position                                                   # doctest: +SKIP
    {'batch_in_epoch': 4, 'epoch': 1, 'step': 35, 'steps_per_epoch': 31, 'total_steps': 62}
    """

    document: dict
    tensors: dict[str, torch.Tensor]

    @property
    def meta(self) -> CheckpointDocument:
        """The validated, typed view of the document."""
        return parse(CheckpointDocument, self.document, "checkpoint")

    @property
    def position(self) -> dict:
        return dump(parse(Position, self.document["position"], "checkpoint position"))

    @property
    def identity(self) -> Identity:
        return parse(Identity, self.document["identity"], "checkpoint identity")


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
        for stat in BN_BUFFERS:
            value = getattr(bn, stat, None)
            if value is not None:
                tensors[f"bn/{name}.{stat}"] = _cpu(value)
    tensors[RNG_STATE] = torch.get_rng_state().clone()
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
            for stat in BN_BUFFERS:
                value = getattr(bn, stat, None)
                if value is not None:
                    value.copy_(tensors[f"bn/{name}.{stat}"])
    for layer in masked_modules(model).values():
        layer._mask_cache = None  # copy_ bumps scores._version anyway; never trust a cache across a load
    torch.set_rng_state(tensors[RNG_STATE])


def expected_tensors(model: nn.Module) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """name -> (shape, dtype) of every tensor a checkpoint of `model` must hold (momentum: may hold)."""
    expected = {}
    for name, param in model.named_parameters():
        expected[f"scores/{name}"] = (tuple(param.shape), torch.float32)
        expected[f"momentum/{name}"] = (tuple(param.shape), torch.float32)
    for name, bn in batchnorm_modules(model).items():
        for stat in BN_BUFFERS:
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
    recorded = dump_identity(checkpoint.identity)
    differences = [
        f"{key} {recorded.get(key)!r} (this run: {value!r})"
        for key, value in identity.items()
        if recorded.get(key) != value
    ]
    if differences:
        raise MaskforgeError(f"{label} was written by a different search: {'; '.join(differences)}")
    recorded_identity = checkpoint.identity
    structure = _structure(recorded_identity, label)
    expected = expected_tensors(structure)
    names = set(checkpoint.tensors) - {RNG_STATE}
    missing = sorted(n for n in expected if n not in names and not n.startswith("momentum/"))
    extra = sorted(names - set(expected))
    if missing or extra:
        raise MaskforgeError(
            f"{label} does not match architecture {recorded_identity.arch}: missing tensors "
            f"{missing[:3]}, unexpected tensors {extra[:3]}"
        )
    for name in sorted(names):
        shape, dtype = expected[name]
        tensor = checkpoint.tensors[name]
        if tuple(tensor.shape) != shape or tensor.dtype != dtype:
            raise MaskforgeError(
                f"{label}: tensor {name} is {list(tensor.shape)} {tensor.dtype}, architecture "
                f"{recorded_identity.arch} needs {list(shape)} {dtype}"
            )
    momenta = {n for n in names if n.startswith("momentum/")}
    if momenta and len(momenta) != sum(n.startswith("scores/") for n in expected):
        raise MaskforgeError(f"{label}: momentum buffers exist for some layers only")


def _structure(identity: Identity, label: str) -> nn.Module:
    """The checkpoint's architecture on the meta device. A builder reference's code must still build the
    structure recorded at search start (the artifact's rule, `convert.build_recorded`): an edit that keeps
    every shape (a BatchNorm now a GroupNorm) still changes the network the scores belong to. Checkpoints
    from before the record compare shapes only."""
    arch, args, k = identity.arch, identity.arch_args.to_dict(), identity.k
    with torch.device("meta"):
        if identity.structure is None:
            return archs.build_structure(arch, args, k)
        try:
            return convert.build_recorded(arch, args, k, identity.structure, identity.library, identity.calls)
        except MaskforgeError as exc:
            raise MaskforgeError(f"{label}: {exc}") from None


def dump_identity(identity: Identity) -> dict:
    """An identity as the JSON values a checkpoint records (`arch_args` as `archs` takes them)."""
    values = dump(identity)
    values["arch_args"] = identity.arch_args.to_dict()
    values.setdefault("topk", identity.topk)
    return values


# --- save / load -----------------------------------------------------------------------------------------


def save_checkpoint(checkpoint: Checkpoint, path: str | os.PathLike) -> Path:
    """Write atomically: a reader or a crash sees the previous checkpoint or this one, never a torn file."""
    document = {key: value for key, value in checkpoint.document.items() if key != "digests"}
    document["format"], document["format_version"] = FORMAT_NAME, FORMAT_VERSION
    tensors = {name: checkpoint.tensors[name] for name in sorted(checkpoint.tensors)}
    # NaN is allowed here: a diverged search still checkpoints (its losses are NaN) and resumes the same way.
    checkpoint.document = container.write_file(path, document, tensors, key=METADATA_KEY, allow_nan=True)
    return Path(path)


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Read and validate a checkpoint (layout, JSON schema, version, digests); CPU tensors."""
    path = Path(path)
    label = f"checkpoint {path}"
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise MaskforgeError(
            f"no checkpoint at {path}: nothing to resume (a search writes one at the end "
            f"of every epoch and every checkpoint_every steps)"
        ) from None
    except IsADirectoryError:
        raise MaskforgeError(f"{path} is a folder, not a checkpoint file") from None
    except OSError as exc:
        raise MaskforgeError(f"cannot read {label}: {exc.strerror or exc}") from None
    document = container.read_document(data, key=METADATA_KEY, label=label, kind=KIND, allow_nan=True)
    parse_checkpoint_document(document, label)
    arrays = container.load_tensors(data, label)
    container.check_document_digest(document, label, allow_nan=True)
    container.check_tensor_digests(document, arrays, label)
    if RNG_STATE not in arrays or arrays[RNG_STATE].dtype.name != "uint8":
        raise MaskforgeError(f"{label} is corrupt: the RNG state is missing")
    return Checkpoint(document, {name: torch.from_numpy(array) for name, array in arrays.items()})


def read_position(path: str | os.PathLike) -> dict | None:
    """The `position` of the checkpoint at `path` from its header alone (cheap; None if unreadable).

    For progress polling and tests; `load_checkpoint` is the validating reader.
    """
    try:
        with open(path, "rb") as handle:
            prefix = handle.read(8)
            size = int.from_bytes(prefix, "little")
            if len(prefix) < 8 or size > container.MAX_HEADER_BYTES:
                return None
            data = prefix + handle.read(size)
        document = container.read_document(data, key=METADATA_KEY, label=str(path), kind=KIND, allow_nan=True)
        return dump(parse(Position, document.get("position"), "position"))
    except (OSError, MaskforgeError):
        return None

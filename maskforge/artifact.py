"""The artifact: seed + bit-packed masks + BN statistics + a JSON document, in one .safetensors file.

Layout (docs/FORMAT.md is the normative description):

* tensor `mask/<param>` — uint8, the layer's mask flattened in C order and packed 8 per byte, least
  significant bit first (bit j of byte b is weight 8b+j); the last byte is zero-padded.
* tensors `bn/<module>.running_mean` and `bn/<module>.running_var` — float32.
* metadata key `maskforge` — the JSON document, `maskforge.schema.ArtifactDocument`.

The container (safetensors layout, header JSON, digests) is `maskforge.container`; the document's
fields and the rules between them are `maskforge.schema`. This module adds what needs the
architecture: every layer, shape, kept count and batch-norm tensor must be what the architecture and k
imply, and every mask keeps exactly its recorded count. `check_weight_digests` (used by materialize and
verify) compares regenerated weights with their recorded digests.

Loading is strict because artifacts are untrusted input; tests/test_fuzz.py mutates real artifacts
over a thousand ways: each mutant is refused or gives identical outputs.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn

from . import archs, container, convert, regen
from .errors import MaskforgeError
from .fileio import atomic_write, read_bytes
from .layers import batchnorm_modules, get_topk, kept_count, masked_modules, set_topk
from .sizes import bits_per_weight
from .topk import global_kept_count
from .schema import FORMAT_NAME, FORMAT_VERSION, METADATA_KEY, ArchArgs, ArtifactDocument, InputSpec, dump
from .schema import parse_artifact_document

__all__ = [
    "Artifact",
    "build_artifact",
    "save_artifact",
    "load_artifact",
    "artifact_bytes",
    "artifact_from_bytes",
    "pack_mask",
    "unpack_mask",
    "apply_masks",
    "load_bn_stats",
    "check_weight_digests",
    "inspect_artifact",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "METADATA_KEY",
]

KIND = "maskforge artifact"
BN_STATS = ("running_mean", "running_var")


def _field(path: str, doc: str) -> property:
    """A read-only property reading `path` (dotted) from the typed document `meta`."""

    def get(artifact: "Artifact"):
        value = artifact.meta
        for name in path.split("."):
            value = getattr(value, name)
        return value

    return property(get, doc=doc)


@dataclass
class Artifact:
    """An in-memory artifact: the sealed JSON document, boolean masks and BN statistics.

    `document` is the JSON document exactly as stored (re-saving a loaded artifact gives the same
    bytes); `meta` is its validated, typed view, which the properties read.

    >>> art = load_artifact("runs/demo/artifact.safetensors")       # doctest: +SKIP
    >>> art.arch, art.k, art.seed, art.masked_weights               # doctest: +SKIP
    ('conv4', 0.5, 0, 2425024)
    """

    document: dict
    masks: dict[str, torch.Tensor]  # param name -> bool tensor of the weight's shape
    bn_stats: dict[str, torch.Tensor]  # "<module>.running_mean"/".running_var" -> float32
    path: Path | None = None
    file_bytes: int | None = None
    meta: ArtifactDocument | None = field(default=None, repr=False)
    structure: nn.Module | None = field(default=None, repr=False)  # the architecture on the meta device

    def __post_init__(self) -> None:
        if self.meta is None:
            self.meta = parse_artifact_document(self.document, "artifact")

    arch = _field("arch.name", "The registered architecture name.")
    k = _field("k", "The fraction of weights kept.")
    seed = _field("seed", "The generator seed.")
    init = _field("init.distribution", "The weight distribution.")
    scale_fan = _field("init.scale_fan", "Whether sigma uses k * fan_in.")
    topk = _field("topk", "The top-k rule: 'layer' (the kept-count rule per layer) or 'global'.")
    spec = _field("input", "The input spec (`InputSpec`).")

    @property
    def arch_args(self) -> dict:
        """The architecture's arguments (`archs.create_model` keywords), typed as the builders expect."""
        return self.meta.arch.args.to_dict()

    @property
    def masked_weights(self) -> int:
        return sum(mask.numel() for mask in self.masks.values())

    @property
    def kept_weights(self) -> int:
        return sum(layer.kept for layer in self.meta.layers.values())

    @property
    def digest(self) -> str:
        """One SHA-256 naming this artifact's content (the document's digest, which covers all others)."""
        return self.meta.digests.document

    def create_model(self) -> nn.Module:
        """The search-time masked model with the stored masks and BN statistics (weights regenerated)."""
        model = archs.create_model(
            self.arch, **self.arch_args, k=self.k, seed=self.seed, init=self.init, scale_fan=self.scale_fan
        )
        set_topk(model, self.topk, self.k)
        apply_masks(model, self.masks)
        load_bn_stats(model, self.bn_stats)
        return model.eval()


# --- building from a model ---------------------------------------------------------------------------


def build_artifact(
    model: nn.Module,
    *,
    arch: str,
    arch_args: dict,
    spec: InputSpec,
    seed: int,
    init: str,
    scale_fan: bool,
    k: float,
    provenance: dict | None = None,
    topk: str = "layer",
    builder: dict | None = None,
) -> Artifact:
    """Capture a searched model's masks and BN statistics into a sealed, validated `Artifact`.

    `builder`: a builder reference's record at search start (`convert.builder_record`; the search passes
    the one its checkpoints carry, so that an edit of the code during the search is not recorded as the
    searched network); by default it is taken from the code now."""
    named = masked_modules(model)
    masks = {f"{name}.weight": layer.mask().detach().cpu().clone() for name, layer in named.items()}
    bn_stats = {
        f"{name}.{stat}": getattr(bn, stat).detach().float().cpu().clone()
        for name, bn in batchnorm_modules(model).items()
        for stat in BN_STATS
    }
    weights = {f"{name}.weight": layer.weight.detach().cpu().numpy() for name, layer in named.items()}
    record = convert.builder_record(arch, arch_args) if builder is None else builder
    document = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "arch": {"name": arch, "args": dump(ArchArgs(**arch_args)), **record},
        "input": spec.to_dict(),
        "seed": int(seed),
        "init": {"distribution": init, "scale_fan": bool(scale_fan)},
        "k": float(k),
        "generator": {"id": regen.GENERATOR_ID, "version": regen.GENERATOR_VERSION},
        "layers": {
            param: {
                "shape": list(mask.shape),
                "kept": int(mask.sum()),
                "density": int(mask.sum()) / mask.numel(),
                "fan_in": regen.fan_in(mask.shape),
            }
            for param, mask in masks.items()
        },
        "bn": sorted({name.rsplit(".", 1)[0] for name in bn_stats}),
        "provenance": provenance or {},
        "digests": {"weights": {param: regen.weight_digest(w) for param, w in weights.items()}},
    }
    if topk != "layer":  # the default rule is not written, so artifacts from before it existed stay valid
        document["topk"] = topk
    document = container.seal(document, stored_tensors(masks, bn_stats))
    return Artifact(document, masks, bn_stats)


def apply_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """Fix each layer's mask by setting its scores to the mask (1 kept, 0 dropped): the model's top-k rule
    then returns exactly these masks, provided their counts follow that rule (checked: per layer, or for
    global top-k the total and at least one per layer)."""
    named = masked_modules(model)
    counts = {name: int(masks[f"{name}.weight"].sum()) for name in named}
    if get_topk(model) == "global":
        sizes = [layer.weight.numel() for layer in named.values()]
        k = next(iter(named.values())).k
        _check_global_counts(counts, sizes, k, "masks")
    else:
        for name, layer in named.items():
            if counts[name] != layer.kept:
                raise MaskforgeError(
                    f"layer {name}: mask keeps {counts[name]} weights, k={layer.k} requires {layer.kept}"
                )
    with torch.no_grad():
        for name, layer in named.items():
            layer.scores.copy_(masks[f"{name}.weight"].to(layer.scores.device).float())


def _check_global_counts(counts: dict[str, int], sizes: list[int], k: float, label: str) -> None:
    """The global rule's counts: every layer keeps at least one, all together global_kept_count(sizes, k)."""
    starved = next((name for name, count in counts.items() if count < 1), None)
    if starved is not None:
        raise MaskforgeError(f"{label}: layer {starved} keeps no weight; global top-k keeps at least one per layer")
    total, expected = sum(counts.values()), global_kept_count(sizes, k)
    if total != expected:
        raise MaskforgeError(
            f"{label}: the layers keep {total:,} weights in all, global top-k with k={k} over "
            f"{sum(sizes):,} weights in {len(sizes)} layers keeps {expected:,}"
        )


def load_bn_stats(model: nn.Module, bn_stats: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, bn in batchnorm_modules(model).items():
            for stat in BN_STATS:
                getattr(bn, stat).copy_(bn_stats[f"{name}.{stat}"])


# --- bits ----------------------------------------------------------------------------------------------


def pack_mask(mask: torch.Tensor) -> np.ndarray:
    """bool tensor -> uint8 array, C order, least significant bit first."""
    return np.packbits(mask.detach().cpu().numpy().reshape(-1).astype(np.uint8), bitorder="little")


def unpack_mask(packed: np.ndarray, shape: tuple[int, ...]) -> torch.Tensor:
    count = math.prod(shape)
    if packed.dtype != np.uint8 or packed.shape != ((count + 7) // 8,):
        raise MaskforgeError(
            f"packed mask has shape {packed.shape} and dtype {packed.dtype}, expected "
            f"uint8 of {(count + 7) // 8} bytes for weights of shape {list(shape)}"
        )
    bits = np.unpackbits(packed, bitorder="little")
    if bits[count:].any():
        raise MaskforgeError("packed mask has non-zero padding bits")
    return torch.from_numpy(bits[:count].astype(bool).reshape(shape))


def stored_tensors(masks: dict[str, torch.Tensor], bn_stats: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """The tensors the file stores, by name: packed masks and float32 little-endian statistics."""
    tensors = {f"mask/{param}": pack_mask(mask) for param, mask in masks.items()}
    tensors.update({f"bn/{name}": stat.numpy().astype("<f4") for name, stat in bn_stats.items()})
    return tensors


# --- save / load -------------------------------------------------------------------------------------


def artifact_bytes(artifact: Artifact) -> bytes:
    """The exact file content of `artifact` (deterministic: same artifact, same bytes)."""
    tensors = stored_tensors(artifact.masks, artifact.bn_stats)
    artifact.document = container.seal(artifact.document, tensors)
    return container.serialize(artifact.document, tensors, key=METADATA_KEY)


def save_artifact(artifact: Artifact, path: str | os.PathLike) -> Path:
    """Write `artifact` to `path` atomically (a temporary file, fsync, rename)."""
    path = Path(path)
    data = artifact_bytes(artifact)
    atomic_write(path, data)
    artifact.path, artifact.file_bytes = path, len(data)
    return path


def load_artifact(path: str | os.PathLike) -> Artifact:
    """Read and fully validate an artifact; any inconsistency raises `MaskforgeError`."""
    path = Path(path)
    data = read_bytes(path, "artifact")
    artifact = artifact_from_bytes(data, str(path))
    artifact.path, artifact.file_bytes = path, len(data)
    return artifact


def artifact_from_bytes(
    data: bytes, label: str = "artifact", *, on_check: Callable[[str, str], None] | None = None
) -> Artifact:
    """Parse and fully validate the bytes of an artifact file (docs/FORMAT.md section 2.4).

    `on_check(stage, detail)` is called after each stage passes (`maskforge verify` lists them); the
    first failing stage raises `MaskforgeError` naming the field, tensor or layer at fault.
    """
    passed = on_check or (lambda stage, detail: None)
    document = container.read_document(data, key=METADATA_KEY, label=label, kind=KIND)
    tensors = container.load_tensors(data, label)
    passed(
        "header",
        f"safetensors layout: {len(tensors)} tensors laid out contiguously over "
        f"{sum(array.nbytes for array in tensors.values()):,} bytes",
    )
    meta = parse_artifact_document(document, label)
    passed(
        "schema",
        f"format {FORMAT_NAME} v{meta.format_version}, arch {meta.arch.name}, k={meta.k}, "
        f"seed={meta.seed}, init {meta.init.distribution}",
    )
    container.check_document_digest(document, label)
    passed("document digest", f"sha256 {meta.digests.document[:16]}...")
    container.check_tensor_digests(document, tensors, label)
    passed("tensor digests", f"{len(tensors)} stored tensors match their sha256")
    structure = check_structure(meta, tensors, label)
    rebuilt = (
        f"; its code ({meta.arch.library} at search time) rebuilds the recorded structure "
        f"(sha256 {(meta.arch.structure_digest or '')[:16]}...)"
        + (f" and module calls (sha256 {meta.arch.calls_digest[:16]}...)" if meta.arch.calls_digest else "")
        if meta.arch.structure is not None
        else ""
    )
    passed(
        "structure",
        f"{len(meta.layers)} masked layers and {len(meta.bn)} batch norms match "
        f"{meta.arch.name} {meta.arch.args.to_dict()}{rebuilt}",
    )
    masks = {}
    for param, info in meta.layers.items():
        try:
            masks[param] = unpack_mask(tensors[f"mask/{param}"], tuple(info.shape))
        except MaskforgeError as exc:
            raise MaskforgeError(f"{label}: layer {param}: {exc}") from None
        if int(masks[param].sum()) != info.kept:
            raise MaskforgeError(
                f"{label}: layer {param} keeps {int(masks[param].sum())} weights but the metadata says {info.kept}"
            )
    passed("masks", f"{sum(m.numel() for m in masks.values()):,} mask bits, zero padding, kept counts as recorded")
    bn_stats = {
        name[3:]: torch.from_numpy(array.astype(np.float32))
        for name, array in tensors.items()
        if name.startswith("bn/")
    }
    return Artifact(document, masks, bn_stats, meta=meta, structure=structure)


# --- checks that need the architecture -----------------------------------------------------------------


def _require(condition: bool, label: str, message: str) -> None:
    if not condition:
        raise MaskforgeError(f"{label}: {message}")


def check_structure(meta: ArtifactDocument, tensors: dict[str, np.ndarray], label: str) -> nn.Module:
    """Every layer, shape, kept count and batch-norm tensor must be what the architecture and k imply.

    Returns the architecture built on the meta device (no memory), for listing layers in network order.
    """
    name, args = meta.arch.name, meta.arch.args.to_dict()
    reference = convert.is_reference(name)
    _require(
        reference or name in archs.ARCHS,
        label,
        f"unknown architecture {name!r} (known: {', '.join(archs.ARCHS)}, or a builder reference)",
    )
    _require(
        not reference or meta.arch.structure is not None,
        label,
        f"architecture {name} is a builder reference, but arch.structure is missing",
    )
    _require(
        reference or (meta.arch.structure is None and meta.arch.library is None),
        label,
        f"arch.structure and arch.library belong to builder references, not to {name}",
    )
    try:
        with torch.device("meta"):
            if reference:
                structure = convert.build_recorded(
                    name, args, meta.k, meta.arch.structure, meta.arch.library, meta.arch.calls
                )
            else:
                structure = archs.build_structure(name, args, meta.k)
    except MaskforgeError as exc:
        raise MaskforgeError(f"{label}: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - validated arguments that a builder still refuses
        raise MaskforgeError(
            f"{label}: cannot build architecture {name} with {args}: {type(exc).__name__}: {exc}"
        ) from None
    _check_layers(meta, structure, tensors, label)
    _check_batchnorm(meta, structure, tensors, label)
    expected = {f"mask/{param}" for param in meta.layers}
    expected |= {f"bn/{module}.{stat}" for module in meta.bn for stat in BN_STATS}
    unexpected = sorted(set(tensors) - expected)
    _require(not unexpected, label, f"unexpected tensors in file: {unexpected[:3]}")
    return structure


def _check_layers(meta: ArtifactDocument, structure: nn.Module, tensors: dict[str, np.ndarray], label: str) -> None:
    expected = {f"{name}.weight": list(layer.weight.shape) for name, layer in masked_modules(structure).items()}
    if set(meta.layers) != set(expected):
        raise MaskforgeError(
            f"{label}: layers do not match architecture {meta.arch.name} "
            f"(missing {sorted(set(expected) - set(meta.layers))[:3]}, "
            f"unexpected {sorted(set(meta.layers) - set(expected))[:3]})"
        )
    for param, shape in expected.items():
        info, count = meta.layers[param], math.prod(shape)
        _require(info.shape == shape, label, f"layer {param} has shape {info.shape}, the architecture says {shape}")
        # With the global rule each layer's count is free (1..n); the schema checked that range.
        _require(
            meta.topk != "layer" or info.kept == kept_count(count, meta.k),
            label,
            f"layer {param}: kept count {info.kept} does not match k={meta.k}",
        )
        array = tensors.get(f"mask/{param}")
        _require(array is not None, label, f"mask of layer {param} is missing")
        _require(
            array.dtype == np.uint8 and array.shape == ((count + 7) // 8,),
            label,
            f"mask/{param} is {array.dtype} {list(array.shape)}, expected uint8 [{(count + 7) // 8}]",
        )
    if meta.topk == "global":
        _check_global_counts(
            {param: meta.layers[param].kept for param in expected},
            [math.prod(shape) for shape in expected.values()],
            meta.k,
            label,
        )


def _check_batchnorm(meta: ArtifactDocument, structure: nn.Module, tensors: dict[str, np.ndarray], label: str) -> None:
    modules = batchnorm_modules(structure)
    _require(
        meta.bn == sorted(modules),
        label,
        f"bn lists {len(meta.bn)} batch norms but architecture {meta.arch.name} has {len(modules)} "
        f"(first expected: {sorted(modules)[:1]})",
    )
    for module, bn in modules.items():
        for stat in BN_STATS:
            name = f"bn/{module}.{stat}"
            array = tensors.get(name)
            _require(array is not None, label, "batch-norm statistics do not match the architecture")
            _require(
                array.dtype == np.float32 and list(array.shape) == [bn.num_features],
                label,
                f"{name} has shape {list(array.shape)} {array.dtype}, expected [{bn.num_features}] float32",
            )
            _require(bool(np.isfinite(array).all()), label, f"{name} has non-finite values")
            _require(stat != "running_var" or bool((array >= 0).all()), label, f"{name} has negative variances")


def regenerate_weights(
    artifact: Artifact, *, digests: bool, keep: bool = True, threads: int | None = None
) -> dict[str, tuple[np.ndarray | None, str | None]]:
    """Every masked layer's weight regenerated from the artifact's seed and distribution (and, with
    `digests`, hashed), in worker threads: `regen.generate_many` over the artifact's layer shapes."""
    shapes = {param: tuple(info["shape"]) for param, info in artifact.document["layers"].items()}
    return regen.generate_many(
        artifact.seed,
        shapes,
        artifact.init,
        k=artifact.k,
        scale_fan=artifact.scale_fan,
        digests=digests,
        keep=keep,
        threads=threads,
    )


def check_weight_digests(artifact: Artifact, digests: dict[str, str]) -> None:
    """Raise, naming the first layer in the artifact's order, if regenerated weights (given by their
    SHA-256, `regen.weight_digest`) differ from the digests recorded at search time."""
    recorded = artifact.meta.digests.weights
    bad = [param for param in recorded if param in digests and digests[param] != recorded[param]]
    if bad:
        raise MaskforgeError(
            f"regenerated weights of layer {bad[0]} do not match the artifact's digest "
            f"(field digests.weights.{bad[0]}; {len(bad)} of {len(recorded)} layers differ): "
            f"this generator ({regen.GENERATOR_ID} v{regen.GENERATOR_VERSION}) gives a "
            f"different network than the one searched"
        )


def _builder_summary(artifact: Artifact) -> dict:
    """What a builder reference's artifact depends on (inspect); nothing for a registered architecture."""
    arch = artifact.meta.arch
    if arch.structure is None:
        return {}
    user_code = not artifact.arch.startswith("torchvision:")
    return {
        "library": arch.library,
        "structure_digest": arch.structure_digest,
        "user_code": user_code,
        "depends_on": (
            f"user code {artifact.arch.split(':')[0]} (not stored in the artifact: loading needs "
            f"it, unchanged in structure)"
            if user_code
            else f"{arch.library.split()[0]} (any version that builds the same structure)"
        ),
        "fixed_tensors": convert.fixed_tensors(artifact.structure),
    }


def inspect_artifact(path: str | os.PathLike) -> dict:
    """A JSON-able summary of an artifact: what `maskforge inspect` shows.

    >>> summary = inspect_artifact("runs/demo/artifact.safetensors")        # doctest: +SKIP
    >>> summary["bits_per_weight"] <= 1.1                                    # doctest: +SKIP
    True
    """
    artifact = load_artifact(path)
    doc = artifact.document
    masked = artifact.masked_weights
    bn_values = sum(stat.numel() for stat in artifact.bn_stats.values())
    return {
        "path": str(artifact.path),
        "file_bytes": artifact.file_bytes,
        "format": doc["format"],
        "format_version": artifact.meta.format_version,
        "arch": artifact.arch,
        "arch_args": artifact.arch_args,
        **_builder_summary(artifact),
        "k": artifact.k,
        "seed": artifact.seed,
        "init": artifact.init,
        "scale_fan": artifact.scale_fan,
        "topk": artifact.topk,
        "generator": doc["generator"],
        "input": artifact.spec.to_dict(),
        "masked_weights": masked,
        "kept_weights": artifact.kept_weights,
        "density": artifact.kept_weights / masked,
        "bn_values": bn_values,
        "bits_per_weight": bits_per_weight(artifact.file_bytes, masked),
        "dense_float32_bytes": 4 * (masked + bn_values),
        # in network order (the JSON document keeps them sorted by name)
        "layers": [
            {"name": f"{name}.weight", **dump(artifact.meta.layers[f"{name}.weight"])}
            for name in masked_modules(artifact.structure)
        ],
        "provenance": doc["provenance"],
        "digest": artifact.digest,
    }

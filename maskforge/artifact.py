"""The artifact: seed + bit-packed masks + BN statistics + a JSON document, in one .safetensors file.

Layout (docs/FORMAT.md is the normative description):

* tensor `mask/<param>` — uint8, the layer's mask flattened in C order and packed 8 per byte, least
  significant bit first (bit j of byte b is weight 8b+j); the last byte is zero-padded.
* tensors `bn/<module>.running_mean` and `bn/<module>.running_var` — float32.
* metadata key `maskforge` — the JSON document (sorted keys) described by `_validate_document`.

Loading validates the schema, the format version, every shape against the architecture, and the
SHA-256 digests of every tensor and of the document itself. `verify_weights` (used by materialize)
recomputes the digests of the regenerated weights.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.numpy import load as _st_load_bytes
from safetensors.numpy import save as _st_save_bytes

from . import archs, regen
from .data import InputSpec
from .errors import MaskforgeError
from .fileio import atomic_write
from .layers import batchnorm_modules, kept_count, masked_modules

FORMAT_NAME = "maskforge-artifact"
FORMAT_VERSION = 1
METADATA_KEY = "maskforge"
_BN_STATS = ("running_mean", "running_var")


@dataclass
class Artifact:
    """An in-memory artifact: the JSON document, boolean masks and BN statistics.

    >>> art = load_artifact("runs/demo/artifact.safetensors")       # doctest: +SKIP
    >>> art.arch, art.k, art.seed, art.masked_weights               # doctest: +SKIP
    ('conv4', 0.5, 0, 2425024)
    """

    document: dict
    masks: dict[str, torch.Tensor]          # param name -> bool tensor of the weight's shape
    bn_stats: dict[str, torch.Tensor]       # "<module>.running_mean"/".running_var" -> float32
    path: Path | None = None
    file_bytes: int | None = None
    _structure: nn.Module | None = field(default=None, repr=False)

    @property
    def arch(self) -> str:
        return self.document["arch"]["name"]

    @property
    def arch_args(self) -> dict:
        return self.document["arch"]["args"]

    @property
    def k(self) -> float:
        return self.document["k"]

    @property
    def seed(self) -> int:
        return self.document["seed"]

    @property
    def init(self) -> str:
        return self.document["init"]["distribution"]

    @property
    def scale_fan(self) -> bool:
        return self.document["init"]["scale_fan"]

    @property
    def spec(self) -> InputSpec:
        return InputSpec.from_dict(self.document["input"])

    @property
    def masked_weights(self) -> int:
        return sum(mask.numel() for mask in self.masks.values())

    @property
    def kept_weights(self) -> int:
        return sum(layer["kept"] for layer in self.document["layers"].values())

    @property
    def digest(self) -> str:
        """One SHA-256 naming this artifact's content (the document's digest, which covers all others)."""
        return self.document["digests"]["document"]

    def create_model(self) -> nn.Module:
        """The search-time masked model with the stored masks and BN statistics (weights regenerated)."""
        model = archs.create_model(self.arch, **self.arch_args, k=self.k, seed=self.seed, init=self.init,
                                   scale_fan=self.scale_fan)
        apply_masks(model, self.masks)
        load_bn_stats(model, self.bn_stats)
        return model.eval()


# --- building from a model ---------------------------------------------------------------------------

def build_artifact(model: nn.Module, *, arch: str, arch_args: dict, spec: InputSpec, seed: int, init: str,
                   scale_fan: bool, k: float, provenance: dict | None = None) -> Artifact:
    """Capture a searched model's masks and BN statistics into an `Artifact` (nothing is written)."""
    layers = masked_modules(model)
    masks = {f"{name}.weight": layer.mask().detach().cpu().clone() for name, layer in layers.items()}
    bn_stats = {}
    for name, bn in batchnorm_modules(model).items():
        for stat in _BN_STATS:
            bn_stats[f"{name}.{stat}"] = getattr(bn, stat).detach().float().cpu().clone()
    weights = {f"{name}.weight": layer.weight.detach().cpu().numpy() for name, layer in layers.items()}
    document = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "arch": {"name": arch, "args": arch_args},
        "input": spec.to_dict(),
        "seed": int(seed),
        "init": {"distribution": init, "scale_fan": bool(scale_fan)},
        "k": float(k),
        "generator": {"id": regen.GENERATOR_ID, "version": regen.GENERATOR_VERSION},
        "layers": {param: {"shape": list(mask.shape), "kept": int(mask.sum()),
                           "density": int(mask.sum()) / mask.numel(),
                           "fan_in": regen.fan_in(mask.shape)} for param, mask in masks.items()},
        "bn": sorted({name.rsplit(".", 1)[0] for name in bn_stats}),
        "provenance": provenance or {},
        "digests": {"weights": {param: regen.weight_digest(w) for param, w in weights.items()}},
    }
    return Artifact(document, masks, bn_stats)


def apply_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """Fix each layer's mask by setting its scores to the mask (1 kept, 0 dropped): top-k then returns it."""
    with torch.no_grad():
        for name, layer in masked_modules(model).items():
            mask = masks[f"{name}.weight"].to(layer.scores.device)
            if int(mask.sum()) != layer.kept:
                raise MaskforgeError(f"layer {name}: mask keeps {int(mask.sum())} weights, k={layer.k} "
                                     f"requires {layer.kept}")
            layer.scores.copy_(mask.float())


def load_bn_stats(model: nn.Module, bn_stats: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, bn in batchnorm_modules(model).items():
            for stat in _BN_STATS:
                getattr(bn, stat).copy_(bn_stats[f"{name}.{stat}"])


# --- bits and digests --------------------------------------------------------------------------------

def pack_mask(mask: torch.Tensor) -> np.ndarray:
    """bool tensor -> uint8 array, C order, least significant bit first."""
    return np.packbits(mask.detach().cpu().numpy().reshape(-1).astype(np.uint8), bitorder="little")


def unpack_mask(packed: np.ndarray, shape: tuple[int, ...]) -> torch.Tensor:
    count = math.prod(shape)
    if packed.dtype != np.uint8 or packed.shape != ((count + 7) // 8,):
        raise MaskforgeError(f"packed mask has shape {packed.shape} and dtype {packed.dtype}, expected "
                             f"uint8 of {(count + 7) // 8} bytes for weights of shape {list(shape)}")
    bits = np.unpackbits(packed, bitorder="little")
    if bits[count:].any():
        raise MaskforgeError("packed mask has non-zero padding bits")
    return torch.from_numpy(bits[:count].astype(bool).reshape(shape))


def _tensor_digest(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def _document_digest(document: dict) -> str:
    """SHA-256 of the canonical JSON of the document without its `digests` member."""
    body = {key: value for key, value in document.items() if key != "digests"}
    return hashlib.sha256(_canonical_json(body).encode("utf-8")).hexdigest()


def _canonical_json(value) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


# --- save / load -------------------------------------------------------------------------------------

def artifact_bytes(artifact: Artifact) -> bytes:
    """The exact file content of `artifact` (deterministic: same artifact, same bytes)."""
    tensors = {f"mask/{param}": pack_mask(mask) for param, mask in artifact.masks.items()}
    tensors.update({f"bn/{name}": stat.numpy().astype("<f4") for name, stat in artifact.bn_stats.items()})
    document = dict(artifact.document)
    digests = dict(document["digests"])
    digests["tensors"] = {name: _tensor_digest(array) for name, array in sorted(tensors.items())}
    document["digests"] = digests
    digests["document"] = _document_digest(document)
    artifact.document = document
    return _st_save_bytes(tensors, metadata={METADATA_KEY: _canonical_json(document)})


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
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise MaskforgeError(f"artifact {path} does not exist") from None
    except IsADirectoryError:
        raise MaskforgeError(f"{path} is a folder, not an artifact file") from None
    except OSError as exc:
        raise MaskforgeError(f"cannot read {path}: {exc.strerror or exc}") from None
    artifact = artifact_from_bytes(data, str(path))
    artifact.path, artifact.file_bytes = path, len(data)
    return artifact


def artifact_from_bytes(data: bytes, label: str = "artifact") -> Artifact:
    document, tensors = _read_safetensors(data, label)
    _validate_document(document, label)
    _check_digests(document, tensors, label)
    structure = _check_structure(document, tensors, label)
    masks = {param: unpack_mask(tensors[f"mask/{param}"], tuple(info["shape"]))
             for param, info in document["layers"].items()}
    for param, mask in masks.items():
        if int(mask.sum()) != document["layers"][param]["kept"]:
            raise MaskforgeError(f"{label}: layer {param} keeps {int(mask.sum())} weights but the metadata "
                                 f"says {document['layers'][param]['kept']}")
    bn_stats = {name[3:]: torch.from_numpy(array.astype(np.float32)) for name, array in tensors.items()
                if name.startswith("bn/")}
    return Artifact(document, masks, bn_stats, _structure=structure)


def _read_safetensors(data: bytes, label: str) -> tuple[dict, dict[str, np.ndarray]]:
    header = _read_header(data, label)
    metadata = header.get("__metadata__") or {}
    if METADATA_KEY not in metadata:
        raise MaskforgeError(f"{label} is a safetensors file but not a maskforge artifact "
                             f"(no '{METADATA_KEY}' metadata)")
    try:
        document = json.loads(metadata[METADATA_KEY])
    except (TypeError, ValueError) as exc:
        raise MaskforgeError(f"{label}: the maskforge metadata is not valid JSON ({exc})") from None
    try:
        tensors = _st_load_bytes(data)
    except (SafetensorError, ValueError, TypeError) as exc:
        raise MaskforgeError(f"{label}: corrupt safetensors data ({exc})") from None
    return document, tensors


def _read_header(data: bytes, label: str) -> dict:
    # Parse the header ourselves first: it gives clear messages for truncated or foreign files.
    if len(data) < 8:
        raise MaskforgeError(f"{label} is not a maskforge artifact (only {len(data)} bytes)")
    header_len = int.from_bytes(data[:8], "little")
    if header_len > len(data) - 8 or header_len > 100_000_000:
        raise MaskforgeError(f"{label} is not a maskforge artifact (not a safetensors file, or truncated)")
    try:
        header = json.loads(data[8:8 + header_len])
    except (UnicodeDecodeError, ValueError):
        raise MaskforgeError(f"{label} is not a maskforge artifact (unreadable safetensors header)") from None
    if not isinstance(header, dict):
        raise MaskforgeError(f"{label} is not a maskforge artifact (bad safetensors header)")
    return header


def _require(condition: bool, label: str, message: str) -> None:
    if not condition:
        raise MaskforgeError(f"{label}: {message}")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _validate_document(doc: dict, label: str) -> None:
    """Types, ranges and the format version of the JSON document."""
    _require(isinstance(doc, dict), label, "metadata is not a JSON object")
    _require(doc.get("format") == FORMAT_NAME, label, f"format is {doc.get('format')!r}, not {FORMAT_NAME!r}")
    version = doc.get("format_version")
    _require(_is_int(version), label, "format_version is missing or not an integer")
    if version > FORMAT_VERSION:
        raise MaskforgeError(f"{label} uses artifact format version {version}, newer than this maskforge "
                             f"reads ({FORMAT_VERSION}); upgrade maskforge")
    _require(version == FORMAT_VERSION, label, f"unsupported format version {version}")
    arch = doc.get("arch")
    _require(isinstance(arch, dict) and isinstance(arch.get("name"), str), label, "arch is missing")
    _require(arch["name"] in archs.ARCHS, label,
             f"unknown architecture {arch['name']!r} (known: {', '.join(archs.ARCHS)})")
    args = arch.get("args")
    _require(isinstance(args, dict) and set(args) == {"in_channels", "num_classes", "image_size"}, label,
             "arch.args must have exactly in_channels, num_classes, image_size")
    _require(_is_int(args["in_channels"]) and 1 <= args["in_channels"] <= 64, label, "bad arch.args.in_channels")
    _require(_is_int(args["num_classes"]) and 1 <= args["num_classes"] <= 1_000_000, label,
             "bad arch.args.num_classes")
    size = args["image_size"]
    _require(isinstance(size, list) and len(size) == 2 and all(_is_int(s) and 1 <= s <= 8192 for s in size),
             label, "bad arch.args.image_size")
    seed = doc.get("seed")
    _require(_is_int(seed) and 0 <= seed < 2 ** 63, label, "seed must be a non-negative integer")
    k = doc.get("k")
    _require(isinstance(k, float) and 0.0 < k <= 1.0, label, "k must be a number in (0, 1]")
    init = doc.get("init")
    _require(isinstance(init, dict) and init.get("distribution") in regen.DISTRIBUTIONS
             and isinstance(init.get("scale_fan"), bool), label,
             f"init must name a distribution in {regen.DISTRIBUTIONS} and a boolean scale_fan")
    generator = doc.get("generator")
    _require(generator == {"id": regen.GENERATOR_ID, "version": regen.GENERATOR_VERSION}, label,
             f"generator {generator!r} is not {regen.GENERATOR_ID} v{regen.GENERATOR_VERSION}")
    try:
        spec = InputSpec.from_dict(doc.get("input"))
    except MaskforgeError as exc:
        raise MaskforgeError(f"{label}: bad input spec: {exc}") from None
    _require(spec.channels == args["in_channels"] and [spec.height, spec.width] == size
             and spec.num_classes == args["num_classes"], label, "input spec does not match arch.args")
    _require(isinstance(doc.get("layers"), dict), label, "layers is missing")
    _require(isinstance(doc.get("bn"), list), label, "bn is missing")
    _require(isinstance(doc.get("provenance"), dict), label, "provenance is missing")
    digests = doc.get("digests")
    _require(isinstance(digests, dict) and all(isinstance(digests.get(key), (dict, str)) for key in
                                               ("weights", "tensors", "document")), label, "digests are missing")


def _check_digests(doc: dict, tensors: dict[str, np.ndarray], label: str) -> None:
    if _document_digest(doc) != doc["digests"]["document"]:
        raise MaskforgeError(f"{label}: metadata digest mismatch (the JSON document was modified or corrupted)")
    recorded = doc["digests"]["tensors"]
    if set(recorded) != set(tensors):
        missing, extra = sorted(set(recorded) - set(tensors)), sorted(set(tensors) - set(recorded))
        raise MaskforgeError(f"{label}: tensor set differs from the metadata (missing {missing}, extra {extra})")
    for name, array in tensors.items():
        if _tensor_digest(array) != recorded[name]:
            raise MaskforgeError(f"{label}: tensor {name} does not match its digest (corrupted)")


def _check_structure(doc: dict, tensors: dict[str, np.ndarray], label: str) -> nn.Module:
    """Every layer, shape and kept count must be what the architecture and k imply."""
    with torch.device("meta"):
        structure = archs.build_structure(doc["arch"]["name"], doc["arch"]["args"], doc["k"])
    expected = {f"{name}.weight": list(layer.weight.shape) for name, layer in masked_modules(structure).items()}
    layers = doc["layers"]
    if set(layers) != set(expected):
        raise MaskforgeError(f"{label}: layers do not match architecture {doc['arch']['name']} "
                             f"(missing {sorted(set(expected) - set(layers))[:3]}, "
                             f"unexpected {sorted(set(layers) - set(expected))[:3]})")
    for param, shape in expected.items():
        info = layers[param]
        _require(isinstance(info, dict) and info.get("shape") == shape, label,
                 f"layer {param} has shape {info.get('shape') if isinstance(info, dict) else info}, "
                 f"the architecture says {shape}")
        _require(info.get("kept") == kept_count(math.prod(shape), doc["k"]), label,
                 f"layer {param}: kept count {info.get('kept')} does not match k={doc['k']}")
        _require(f"mask/{param}" in tensors, label, f"mask of layer {param} is missing")
        _require(isinstance(doc["digests"]["weights"].get(param), str), label,
                 f"weight digest of layer {param} is missing")
    bn_expected = {f"bn/{name}.{stat}": [bn.num_features] for name, bn in batchnorm_modules(structure).items()
                   for stat in _BN_STATS}
    bn_present = {name for name in tensors if name.startswith("bn/")}
    _require(bn_present == set(bn_expected), label, "batch-norm statistics do not match the architecture")
    for name, shape in bn_expected.items():
        array = tensors[name]
        _require(array.dtype == np.float32 and list(array.shape) == shape, label,
                 f"{name} has shape {list(array.shape)} {array.dtype}, expected {shape} float32")
        _require(bool(np.isfinite(array).all()), label, f"{name} has non-finite values")
        if name.endswith("running_var"):
            _require(bool((array >= 0).all()), label, f"{name} has negative variances")
    _require(set(tensors) == {f"mask/{p}" for p in expected} | bn_present, label, "unexpected tensors in file")
    return structure


def verify_weights(artifact: Artifact, weights: dict[str, np.ndarray]) -> None:
    """Raise, naming the first layer, if regenerated weights differ from the digests recorded at search."""
    recorded = artifact.document["digests"]["weights"]
    for param, array in weights.items():
        if regen.weight_digest(array) != recorded[param]:
            raise MaskforgeError(f"regenerated weights of layer {param} do not match the artifact's digest: "
                                 f"this generator ({regen.GENERATOR_ID} v{regen.GENERATOR_VERSION}) gives a "
                                 f"different network than the one searched")


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
        "path": str(artifact.path), "file_bytes": artifact.file_bytes,
        "format": doc["format"], "format_version": doc["format_version"],
        "arch": artifact.arch, "arch_args": artifact.arch_args, "k": artifact.k, "seed": artifact.seed,
        "init": artifact.init, "scale_fan": artifact.scale_fan, "generator": doc["generator"],
        "input": doc["input"], "masked_weights": masked, "kept_weights": artifact.kept_weights,
        "density": artifact.kept_weights / masked, "bn_values": bn_values,
        "bits_per_weight": 8.0 * artifact.file_bytes / masked,
        "dense_float32_bytes": 4 * (masked + bn_values),
        "layers": [{"name": name, **info} for name, info in doc["layers"].items()],
        "provenance": doc["provenance"], "digest": artifact.digest,
    }

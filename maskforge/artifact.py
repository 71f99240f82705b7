"""The artifact: seed + bit-packed masks + BN statistics + a JSON document, in one .safetensors file.

Layout (docs/FORMAT.md is the normative description):

* tensor `mask/<param>` — uint8, the layer's mask flattened in C order and packed 8 per byte, least
  significant bit first (bit j of byte b is weight 8b+j); the last byte is zero-padded.
* tensors `bn/<module>.running_mean` and `bn/<module>.running_var` — float32.
* metadata key `maskforge` — the JSON document (sorted keys) described by `_validate_document`.

Loading validates the schema, the format version, every shape against the architecture, and the
SHA-256 digests of every tensor and of the document itself. `check_weight_digests` (used by materialize and verify)
recomputes the digests of the regenerated weights.

Loading is strict because artifacts are untrusted input: the safetensors header is parsed and checked by
us first (only U8/F32 tensors, regions contiguous and covering the file exactly), JSON with duplicate
keys, NaN/Infinity or absurd nesting is refused, unknown fields are refused, and every derived field
(density, fan-in, the batch-norm list) must agree with what it derives from. tests/test_fuzz.py
mutates real artifacts over a thousand ways: each mutant is refused or gives identical outputs.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.numpy import load as _st_load_bytes
from safetensors.numpy import save as _st_save_bytes

from . import archs, regen
from .data import InputSpec
from .digests import canonical_json, document_digest, is_int, tensor_digest
from .errors import MaskforgeError
from .fileio import atomic_write, read_bytes
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


# --- save / load -------------------------------------------------------------------------------------

def artifact_bytes(artifact: Artifact) -> bytes:
    """The exact file content of `artifact` (deterministic: same artifact, same bytes)."""
    tensors = {f"mask/{param}": pack_mask(mask) for param, mask in artifact.masks.items()}
    tensors.update({f"bn/{name}": stat.numpy().astype("<f4") for name, stat in artifact.bn_stats.items()})
    document = dict(artifact.document)
    digests = dict(document["digests"])
    digests["tensors"] = {name: tensor_digest(array) for name, array in sorted(tensors.items())}
    document["digests"] = digests
    digests["document"] = document_digest(document)
    artifact.document = document
    return _st_save_bytes(tensors, metadata={METADATA_KEY: canonical_json(document)})


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


def artifact_from_bytes(data: bytes, label: str = "artifact", *,
                        on_check: Callable[[str, str], None] | None = None) -> Artifact:
    """Parse and fully validate the bytes of an artifact file (docs/FORMAT.md section 2.4).

    `on_check(stage, detail)` is called after each stage passes (`maskforge verify` lists them); the
    first failing stage raises `MaskforgeError` naming the field, tensor or layer at fault.
    """
    passed = on_check or (lambda stage, detail: None)
    header, body = _read_header(data, label)
    passed("header", f"safetensors header: {len(header) - 1} tensors laid out contiguously over "
                     f"{len(body):,} bytes")
    document = _read_document(header, label)
    _validate_document(document, label)
    passed("schema", f"format {FORMAT_NAME} v{document['format_version']}, arch {document['arch']['name']}, "
                     f"k={document['k']}, seed={document['seed']}, init {document['init']['distribution']}")
    if document_digest(document) != document["digests"]["document"]:
        raise MaskforgeError(f"{label}: metadata digest mismatch (the JSON document was modified or corrupted)")
    passed("document digest", f"sha256 {document['digests']['document'][:16]}...")
    tensors = _load_tensors(data, label)
    _check_tensor_digests(document, tensors, label)
    passed("tensor digests", f"{len(tensors)} stored tensors match their sha256")
    structure = _check_structure(document, tensors, label)
    passed("structure", f"{len(document['layers'])} masked layers and {len(document['bn'])} batch norms "
                        f"match {document['arch']['name']} {document['arch']['args']}")
    masks = {}
    for param, info in document["layers"].items():
        try:
            masks[param] = unpack_mask(tensors[f"mask/{param}"], tuple(info["shape"]))
        except MaskforgeError as exc:
            raise MaskforgeError(f"{label}: layer {param}: {exc}") from None
        if int(masks[param].sum()) != info["kept"]:
            raise MaskforgeError(f"{label}: layer {param} keeps {int(masks[param].sum())} weights but the "
                                 f"metadata says {info['kept']}")
    passed("masks", f"{sum(m.numel() for m in masks.values()):,} mask bits, zero padding, kept counts as "
                    f"recorded")
    bn_stats = {name[3:]: torch.from_numpy(array.astype(np.float32)) for name, array in tensors.items()
                if name.startswith("bn/")}
    return Artifact(document, masks, bn_stats, _structure=structure)


# --- the safetensors container -----------------------------------------------------------------------

_DTYPE_BYTES = {"U8": 1, "F32": 4}          # the only dtypes an artifact stores
_TENSOR_FIELDS = {"dtype", "shape", "data_offsets"}
_MAX_HEADER_BYTES = 100_000_000              # safetensors' own limit


def _strict_json(text: str | bytes, label: str, what: str):
    """json.loads that refuses duplicate keys, NaN/Infinity and absurd nesting, with a clear message."""

    def no_duplicates(pairs: list[tuple[str, object]]) -> dict:
        result = {}
        for key, value in pairs:
            if key in result:
                raise MaskforgeError(f"{label}: {what} has the key {key!r} twice")
            result[key] = value
        return result

    def no_constant(name: str):
        raise MaskforgeError(f"{label}: {what} contains {name}, which is not valid JSON")

    try:
        return json.loads(text, object_pairs_hook=no_duplicates, parse_constant=no_constant)
    except MaskforgeError:
        raise
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise MaskforgeError(f"{label}: {what} is not valid JSON ({type(exc).__name__})") from None


def _read_header(data: bytes, label: str) -> tuple[dict, memoryview]:
    """Parse and check the safetensors header ourselves: clear messages for foreign, truncated or forged
    files, independent of the safetensors library's own (also strict) checks."""
    if len(data) < 8:
        raise MaskforgeError(f"{label} is not a maskforge artifact (only {len(data)} bytes)")
    header_len = int.from_bytes(data[:8], "little")
    if header_len > len(data) - 8 or header_len > _MAX_HEADER_BYTES or header_len < 2:
        raise MaskforgeError(f"{label} is not a maskforge artifact (not a safetensors file, or truncated)")
    raw = data[8:8 + header_len]
    if not raw.startswith(b"{"):
        raise MaskforgeError(f"{label} is not a maskforge artifact (unreadable safetensors header)")
    try:
        header = _strict_json(raw, label, "the safetensors header")
    except MaskforgeError as exc:
        reason = str(exc).removeprefix(f"{label}: ")
        raise MaskforgeError(f"{label} is not a maskforge artifact ({reason})") from None
    if not isinstance(header, dict):
        raise MaskforgeError(f"{label} is not a maskforge artifact (bad safetensors header)")
    body = memoryview(data)[8 + header_len:]
    _check_layout(header, len(body), label)
    return header, body


def _check_layout(header: dict, body_bytes: int, label: str) -> None:
    """Every tensor entry well formed, U8 or F32, and the data regions contiguous, disjoint and covering
    the file exactly (no hidden bytes, no overlap, no truncation)."""
    regions = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        where = f"{label}: safetensors entry {name!r}"
        _require(isinstance(entry, dict) and set(entry) == _TENSOR_FIELDS, where,
                 f"must have exactly {sorted(_TENSOR_FIELDS)}")
        _require(isinstance(entry["dtype"], str) and entry["dtype"] in _DTYPE_BYTES, where,
                 f"has dtype {entry['dtype']!r}; an artifact stores only {sorted(_DTYPE_BYTES)}")
        shape, offsets = entry["shape"], entry["data_offsets"]
        _require(isinstance(shape, list) and all(is_int(s) and s >= 0 for s in shape), where, "has a bad shape")
        _require(isinstance(offsets, list) and len(offsets) == 2 and all(is_int(o) and o >= 0 for o in offsets)
                 and offsets[0] <= offsets[1], where, "has bad data_offsets")
        _require(offsets[1] - offsets[0] == math.prod(shape) * _DTYPE_BYTES[entry["dtype"]], where,
                 f"has {offsets[1] - offsets[0]} bytes for shape {shape} {entry['dtype']}")
        regions.append((offsets[0], offsets[1], name))
    position = 0
    for begin, end, name in sorted(regions):
        if begin != position:
            problem = "overlaps another tensor" if begin < position else "leaves a gap before it"
            raise MaskforgeError(f"{label}: safetensors entry {name!r} {problem} (corrupted or forged file)")
        position = end
    if position != body_bytes:
        raise MaskforgeError(f"{label}: the tensors cover {position:,} bytes but the file holds {body_bytes:,} "
                             f"after the header ({'truncated' if position > body_bytes else 'trailing data'})")


def _read_document(header: dict, label: str) -> dict:
    metadata = header.get("__metadata__")
    if not isinstance(metadata, dict) or METADATA_KEY not in metadata:
        raise MaskforgeError(f"{label} is a safetensors file but not a maskforge artifact "
                             f"(no '{METADATA_KEY}' metadata)")
    extra = sorted(set(metadata) - {METADATA_KEY})
    _require(not extra, label, f"unexpected safetensors metadata key(s) {extra} (an artifact has only "
                               f"'{METADATA_KEY}')")
    _require(isinstance(metadata[METADATA_KEY], str), label, "the maskforge metadata is not a JSON string")
    document = _strict_json(metadata[METADATA_KEY], label, "the maskforge metadata")
    _require(isinstance(document, dict), label, "the maskforge metadata is not a JSON object")
    return document


def _load_tensors(data: bytes, label: str) -> dict[str, np.ndarray]:
    try:
        return _st_load_bytes(data)
    except (SafetensorError, ValueError, TypeError) as exc:
        raise MaskforgeError(f"{label}: corrupt safetensors data ({exc})") from None


# --- the JSON document -------------------------------------------------------------------------------

_TOP_LEVEL = {"format", "format_version", "arch", "input", "seed", "init", "k", "generator", "layers", "bn",
              "provenance", "digests"}
_LAYER_FIELDS = {"shape", "kept", "density", "fan_in"}
_HEX64 = re.compile(r"[0-9a-f]{64}")
# Known provenance fields and their types; other keys are allowed (free-form notes) if JSON scalars.
_PROVENANCE_TYPES = {"maskforge_version": str, "torch_version": str, "data": str, "data_kind": str,
                     "epochs": int, "steps": int, "batch_size": int, "processes": int, "heldout_examples": int,
                     "lr": float, "heldout_acc": float}


def _require(condition: bool, label: str, message: str) -> None:
    if not condition:
        raise MaskforgeError(f"{label}: {message}")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_digest_map(value) -> bool:
    return isinstance(value, dict) and all(isinstance(v, str) and _HEX64.fullmatch(v) for v in value.values())


def _validate_document(doc: dict, label: str) -> None:
    """Types, ranges and the format version of the JSON document (docs/FORMAT.md section 2.3)."""
    _require(isinstance(doc, dict), label, "metadata is not a JSON object")
    _require(doc.get("format") == FORMAT_NAME, label, f"format is {doc.get('format')!r}, not {FORMAT_NAME!r}")
    version = doc.get("format_version")
    _require(is_int(version), label, "format_version is missing or not an integer")
    if version > FORMAT_VERSION:
        raise MaskforgeError(f"{label} uses artifact format version {version}, newer than this maskforge "
                             f"reads ({FORMAT_VERSION}); upgrade maskforge")
    _require(version == FORMAT_VERSION, label, f"unsupported format version {version}")
    missing, extra = sorted(_TOP_LEVEL - set(doc)), sorted(set(doc) - _TOP_LEVEL)
    _require(not missing, label, f"metadata field(s) {missing} missing")
    _require(not extra, label, f"unknown metadata field(s) {extra}")
    arch = doc["arch"]
    _require(isinstance(arch, dict) and set(arch) == {"name", "args"} and isinstance(arch["name"], str), label,
             "arch must be an object with exactly name and args")
    _require(arch["name"] in archs.ARCHS, label,
             f"unknown architecture {arch['name']!r} (known: {', '.join(archs.ARCHS)})")
    args = arch["args"]
    # SWEEP-BRANCH MINIMAL EDIT (helper "arch" owns the schema): optional arch.args.width, recorded when != 1.
    _require(isinstance(args, dict) and {"in_channels", "num_classes", "image_size"} <= set(args)
             <= {"in_channels", "num_classes", "image_size", "width"}, label,
             "arch.args must have exactly in_channels, num_classes, image_size (and width when it is not 1)")
    _require("width" not in args or (_is_number(args["width"]) and 0 < args["width"] <= archs.MAX_WIDTH
                                     and args["width"] != 1), label,
             f"arch.args.width must be a number in (0, {archs.MAX_WIDTH:g}] other than 1 (1 is left out), "
             f"got {args.get('width')!r}")
    _require(is_int(args["in_channels"]) and 1 <= args["in_channels"] <= 64, label,
             f"arch.args.in_channels must be an integer in [1, 64], got {args['in_channels']!r}")
    _require(is_int(args["num_classes"]) and 1 <= args["num_classes"] <= 1_000_000, label,
             f"arch.args.num_classes must be an integer in [1, 1000000], got {args['num_classes']!r}")
    size = args["image_size"]
    _require(isinstance(size, list) and len(size) == 2 and all(is_int(s) and 1 <= s <= 8192 for s in size),
             label, f"arch.args.image_size must be [height, width] in [1, 8192], got {size!r}")
    seed = doc["seed"]
    _require(is_int(seed) and 0 <= seed < 2 ** 63, label,
             f"seed must be a non-negative integer below 2^63, got {seed!r}")
    k = doc["k"]
    _require(isinstance(k, float) and 0.0 < k <= 1.0, label, f"k must be a number in (0, 1], got {k!r}")
    init = doc["init"]
    _require(isinstance(init, dict) and set(init) == {"distribution", "scale_fan"}
             and init["distribution"] in regen.DISTRIBUTIONS and isinstance(init["scale_fan"], bool), label,
             f"init must be {{distribution: one of {', '.join(regen.DISTRIBUTIONS)}, scale_fan: true/false}}, "
             f"got {init!r}")
    generator = doc["generator"]
    _require(generator == {"id": regen.GENERATOR_ID, "version": regen.GENERATOR_VERSION}, label,
             f"generator {generator!r} is not {regen.GENERATOR_ID} v{regen.GENERATOR_VERSION}")
    try:
        spec = InputSpec.from_dict(doc["input"])
    except MaskforgeError as exc:
        raise MaskforgeError(f"{label}: bad input spec: {exc}") from None
    _require(spec.channels == args["in_channels"] and [spec.height, spec.width] == size
             and spec.num_classes == args["num_classes"], label, "input spec does not match arch.args")
    _validate_layers(doc["layers"], label)
    bn = doc["bn"]
    _require(isinstance(bn, list) and all(isinstance(name, str) for name in bn) and bn == sorted(set(bn)), label,
             "bn must be a sorted list of distinct batch-norm module names")
    _validate_provenance(doc["provenance"], label)
    digests = doc["digests"]
    _require(isinstance(digests, dict) and set(digests) == {"weights", "tensors", "document"}, label,
             "digests must have exactly weights, tensors and document")
    _require(isinstance(digests["document"], str) and _HEX64.fullmatch(digests["document"]) is not None, label,
             "digests.document must be 64 lowercase hex digits")
    for key in ("weights", "tensors"):
        _require(_is_digest_map(digests[key]), label, f"digests.{key} must map names to 64 lowercase hex digits")
    _require(set(digests["weights"]) == set(doc["layers"]), label,
             "digests.weights must list exactly the masked layers")


def _validate_layers(layers, label: str) -> None:
    _require(isinstance(layers, dict) and layers, label, "layers must be a non-empty object")
    for param, info in layers.items():
        where = f"layer {param}"
        _require(isinstance(info, dict) and set(info) == _LAYER_FIELDS, label,
                 f"{where} must have exactly {', '.join(sorted(_LAYER_FIELDS))}")
        shape = info["shape"]
        _require(isinstance(shape, list) and len(shape) >= 2 and all(is_int(s) and s >= 1 for s in shape), label,
                 f"{where} has a bad shape {shape!r}")
        count = math.prod(shape)
        _require(is_int(info["kept"]) and 1 <= info["kept"] <= count, label,
                 f"{where} has a bad kept count {info['kept']!r}")
        _require(info["density"] == info["kept"] / count and not isinstance(info["density"], bool), label,
                 f"{where}: density {info['density']!r} is not kept/weights = {info['kept'] / count!r}")
        _require(is_int(info["fan_in"]) and info["fan_in"] == regen.fan_in(shape), label,
                 f"{where}: fan_in {info['fan_in']!r} does not match its shape {shape}")


def _validate_provenance(provenance, label: str) -> None:
    _require(isinstance(provenance, dict), label, "provenance must be an object")
    for key, value in provenance.items():
        _require(value is None or isinstance(value, (str, bool)) or _is_number(value), label,
                 f"provenance.{key} must be a string, number, boolean or null, got {type(value).__name__}")
        expected = _PROVENANCE_TYPES.get(key)
        if expected is None or value is None:
            continue
        if expected is str:
            ok = isinstance(value, str)
        elif expected is int:
            ok = is_int(value) and value >= 0
        else:
            ok = _is_number(value) and value >= 0
        if key == "heldout_acc":
            ok = ok and value <= 1
        _require(ok, label, f"provenance.{key} has a bad value {value!r}")


def _check_tensor_digests(doc: dict, tensors: dict[str, np.ndarray], label: str) -> None:
    recorded = doc["digests"]["tensors"]
    if set(recorded) != set(tensors):
        missing, extra = sorted(set(recorded) - set(tensors)), sorted(set(tensors) - set(recorded))
        raise MaskforgeError(f"{label}: tensor set differs from the metadata (missing {missing}, extra {extra})")
    for name, array in sorted(tensors.items()):
        if tensor_digest(array) != recorded[name]:
            raise MaskforgeError(f"{label}: tensor {name} does not match its digest (corrupted)")


def _check_structure(doc: dict, tensors: dict[str, np.ndarray], label: str) -> nn.Module:
    """Every layer, shape and kept count must be what the architecture and k imply."""
    try:
        with torch.device("meta"):
            structure = archs.build_structure(doc["arch"]["name"], doc["arch"]["args"], doc["k"])
    except MaskforgeError as exc:
        raise MaskforgeError(f"{label}: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - validated arguments that a builder still refuses
        raise MaskforgeError(f"{label}: cannot build architecture {doc['arch']['name']} with "
                             f"{doc['arch']['args']}: {type(exc).__name__}: {exc}") from None
    expected = {f"{name}.weight": list(layer.weight.shape) for name, layer in masked_modules(structure).items()}
    layers = doc["layers"]
    if set(layers) != set(expected):
        raise MaskforgeError(f"{label}: layers do not match architecture {doc['arch']['name']} "
                             f"(missing {sorted(set(expected) - set(layers))[:3]}, "
                             f"unexpected {sorted(set(layers) - set(expected))[:3]})")
    for param, shape in expected.items():
        info = layers[param]
        _require(info["shape"] == shape, label, f"layer {param} has shape {info['shape']}, the architecture "
                                                f"says {shape}")
        _require(info["kept"] == kept_count(math.prod(shape), doc["k"]), label,
                 f"layer {param}: kept count {info['kept']} does not match k={doc['k']}")
        _require(f"mask/{param}" in tensors, label, f"mask of layer {param} is missing")
        array = tensors[f"mask/{param}"]
        _require(array.dtype == np.uint8 and array.shape == ((math.prod(shape) + 7) // 8,), label,
                 f"mask/{param} is {array.dtype} {list(array.shape)}, expected uint8 "
                 f"[{(math.prod(shape) + 7) // 8}]")
    bn_modules = batchnorm_modules(structure)
    _require(doc["bn"] == sorted(bn_modules), label,
             f"bn lists {len(doc['bn'])} batch norms but architecture {doc['arch']['name']} has "
             f"{len(bn_modules)} (first expected: {sorted(bn_modules)[:1]})")
    bn_expected = {f"bn/{name}.{stat}": [bn.num_features] for name, bn in bn_modules.items() for stat in _BN_STATS}
    bn_present = {name for name in tensors if name.startswith("bn/")}
    _require(bn_present == set(bn_expected), label, "batch-norm statistics do not match the architecture")
    for name, shape in bn_expected.items():
        array = tensors[name]
        _require(array.dtype == np.float32 and list(array.shape) == shape, label,
                 f"{name} has shape {list(array.shape)} {array.dtype}, expected {shape} float32")
        _require(bool(np.isfinite(array).all()), label, f"{name} has non-finite values")
        if name.endswith("running_var"):
            _require(bool((array >= 0).all()), label, f"{name} has negative variances")
    unexpected = sorted(set(tensors) - ({f"mask/{p}" for p in expected} | bn_present))
    _require(not unexpected, label, f"unexpected tensors in file: {unexpected[:3]}")
    return structure


def check_weight_digests(artifact: Artifact, digests: dict[str, str]) -> None:
    """Raise, naming the first layer in the artifact's order, if regenerated weights (given by their
    SHA-256, `regen.weight_digest`) differ from the digests recorded at search time."""
    recorded = artifact.document["digests"]["weights"]
    bad = [param for param in recorded if param in digests and digests[param] != recorded[param]]
    if bad:
        raise MaskforgeError(f"regenerated weights of layer {bad[0]} do not match the artifact's digest "
                             f"(field digests.weights.{bad[0]}; {len(bad)} of {len(recorded)} layers differ): "
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
        # in network order (the JSON document keeps them sorted by name)
        "layers": [{"name": f"{name}.weight", **doc["layers"][f"{name}.weight"]}
                   for name in masked_modules(artifact._structure)],
        "provenance": doc["provenance"], "digest": artifact.digest,
    }

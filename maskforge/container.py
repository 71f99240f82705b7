"""The file container of artifacts, checkpoints and torch exports: safetensors + one sealed JSON document.

A container is a safetensors file whose `__metadata__` holds exactly one key, whose value is a JSON
document. The document records, under `digests`, the SHA-256 of every stored tensor's bytes and of its
own canonical JSON without the `digests` member (docs/FORMAT.md 2.3 and 2.6). `write` seals and
serializes; `read` parses and checks everything that is not specific to one kind of file:

* the safetensors layout (regions contiguous, covering the file, sizes matching dtype and shape, known
  dtypes, header bounds): checked by the safetensors library itself, whose errors we translate
  (tests/test_artifact.py proves each case is caught there);
* the header JSON: no duplicate keys, no NaN/Infinity (a second parser could read such a header
  differently); the metadata holds our key and nothing else;
* the document digest, then every tensor digest.

>>> data = write({"format": "demo"}, {"x": np.zeros(3, np.float32)}, key="demo")
>>> read(data, key="demo", label="demo", kind="demo file").document["format"]
'demo'
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Mapping

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.numpy import load as _safetensors_load
from safetensors.numpy import save as _safetensors_save
from safetensors.numpy import save_file as _safetensors_save_file

from .errors import MaskforgeError
from .fileio import atomic_path
from .textguard import QUOTE_LIMIT, printable, quote
from .jsonread import strict_json  # noqa: F401 - re-exported: the container's header reader

MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit


def canonical_json(value, *, allow_nan: bool = False) -> str:
    """Sorted keys, no whitespace, ASCII (docs/FORMAT.md 2.3): the same value always gives the same bytes."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=allow_nan)


def document_digest(document: Mapping, *, allow_nan: bool = False) -> str:
    """SHA-256 (lowercase hex) of the canonical JSON of `document` without its `digests` member."""
    body = {key: value for key, value in document.items() if key != "digests"}
    return hashlib.sha256(canonical_json(body, allow_nan=allow_nan).encode("utf-8")).hexdigest()


def tensor_digest(tensor: np.ndarray | torch.Tensor) -> str:
    """SHA-256 (lowercase hex) of a tensor's raw bytes in C order, as safetensors stores them."""
    if isinstance(tensor, torch.Tensor):
        tensor = tensor.detach().cpu().contiguous().numpy()
    return hashlib.sha256(np.ascontiguousarray(tensor).reshape(-1).view(np.uint8)).hexdigest()


def _recorded_digests(document: Mapping) -> dict:
    digests = document.get("digests")
    return digests if isinstance(digests, dict) else {}


@dataclass
class Container:
    """A parsed container: the JSON document exactly as stored (its digests included) and the tensors."""

    document: dict
    tensors: dict[str, np.ndarray]


def seal(document: Mapping, tensors: Mapping[str, np.ndarray], *, allow_nan: bool = False) -> dict:
    """`document` with `digests.tensors` and `digests.document` (re)computed; other digests are kept."""
    sealed = dict(document)
    digests = dict(sealed.get("digests", {}))
    digests["tensors"] = {name: tensor_digest(tensors[name]) for name in sorted(tensors)}
    sealed["digests"] = digests
    digests["document"] = document_digest(sealed, allow_nan=allow_nan)
    return sealed


def write(
    document: Mapping, tensors: Mapping[str, np.ndarray | torch.Tensor], *, key: str, allow_nan: bool = False
) -> bytes:
    """The bytes of a container holding `tensors` (numpy arrays or CPU torch tensors) and the sealed
    `document` (deterministic)."""
    arrays = as_arrays(tensors)
    return serialize(seal(document, arrays, allow_nan=allow_nan), arrays, key=key, allow_nan=allow_nan)


def serialize(sealed: Mapping, tensors: Mapping[str, np.ndarray], *, key: str, allow_nan: bool = False) -> bytes:
    """The bytes of a container holding an already sealed document (see `seal`)."""
    return _safetensors_save(dict(tensors), metadata={key: canonical_json(sealed, allow_nan=allow_nan)})


def as_arrays(tensors: Mapping[str, np.ndarray | torch.Tensor]) -> dict[str, np.ndarray]:
    """numpy views of torch tensors (C order, on the CPU); numpy arrays pass through."""
    return {
        name: t.detach().cpu().contiguous().numpy() if isinstance(t, torch.Tensor) else t for name, t in tensors.items()
    }


def write_file(
    path, document: Mapping, tensors: Mapping[str, np.ndarray | torch.Tensor], *, key: str, allow_nan: bool = False
) -> dict:
    """Seal `document` and write the container to `path` atomically, streaming the tensors to the file
    (no copy of them in memory: checkpoints of large networks hold hundreds of MB). Returns the sealed
    document."""
    tensors = as_arrays(tensors)
    sealed = seal(document, tensors, allow_nan=allow_nan)
    metadata = {key: canonical_json(sealed, allow_nan=allow_nan)}
    with atomic_path(path) as tmp:
        _safetensors_save_file(dict(tensors), str(tmp), metadata=metadata)
    return sealed


def read_document(data: bytes, *, key: str, label: str, kind: str, allow_nan: bool = False) -> dict:
    """The JSON document of a container, from its header alone (no tensor is read or checked)."""
    if len(data) < 8:
        raise MaskforgeError(f"{label} is not a {kind} (only {len(data)} bytes)")
    size = int.from_bytes(data[:8], "little")
    if size > len(data) - 8 or size > MAX_HEADER_BYTES or not data[8:9] == b"{":
        raise MaskforgeError(f"{label} is not a {kind} (not a safetensors file, or truncated)")
    try:
        header = strict_json(data[8 : 8 + size], label, "the safetensors header")
    except MaskforgeError as exc:
        raise MaskforgeError(f"{label} is not a {kind} ({str(exc).removeprefix(label + ': ')})") from None
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(metadata, dict) or key not in metadata:
        raise MaskforgeError(f"{label} is a safetensors file but not a {kind} (no '{key}' metadata)")
    if set(metadata) != {key}:
        raise MaskforgeError(
            f"{label}: unexpected safetensors metadata key(s) {quote(sorted(set(metadata) - {key}))} "
            f"(a {kind} has only '{key}')"
        )
    if not isinstance(metadata[key], str):
        raise MaskforgeError(f"{label}: the {key} metadata is not a JSON string")
    document = strict_json(metadata[key], label, f"the {key} metadata", allow_nan=allow_nan)
    if not isinstance(document, dict):
        raise MaskforgeError(f"{label}: the {key} metadata is not a JSON object")
    return document


def load_tensors(data: bytes, label: str) -> dict[str, np.ndarray]:
    """Every tensor of a safetensors file; the library checks the layout (see the module docstring)."""
    try:
        return _safetensors_load(data)
    except (SafetensorError, ValueError, TypeError) as exc:
        reason = " ".join(str(exc).split()).removeprefix("Error while deserializing: ")
        hint = "truncated, or trailing data" if "not fully covered" in reason else "damaged"
        raise MaskforgeError(f"{label} is {hint} (safetensors: {printable(reason, limit=QUOTE_LIMIT)})") from None


def check_document_digest(document: dict, label: str, *, allow_nan: bool = False) -> None:
    recorded = _recorded_digests(document).get("document")
    if document_digest(document, allow_nan=allow_nan) != recorded:
        raise MaskforgeError(f"{label}: metadata digest mismatch (the JSON document was modified or corrupted)")


def check_tensor_digests(document: dict, tensors: Mapping[str, np.ndarray], label: str) -> None:
    recorded = _recorded_digests(document).get("tensors")
    recorded = recorded if isinstance(recorded, dict) else {}
    if set(recorded) != set(tensors):
        missing, extra = sorted(set(recorded) - set(tensors)), sorted(set(tensors) - set(recorded))
        raise MaskforgeError(
            f"{label}: tensor set differs from the metadata (missing {quote(missing)}, extra {quote(extra)})"
        )
    for name in sorted(tensors):
        if tensor_digest(tensors[name]) != recorded[name]:
            shown = printable(name, limit=QUOTE_LIMIT)
            raise MaskforgeError(f"{label}: tensor {shown} does not match its digest (corrupted)")


def read(data: bytes, *, key: str, label: str, kind: str, allow_nan: bool = False) -> Container:
    """Parse a container and check its layout and both kinds of digests (no schema: that is the caller's)."""
    document = read_document(data, key=key, label=label, kind=kind, allow_nan=allow_nan)
    tensors = load_tensors(data, label)
    check_document_digest(document, label, allow_nan=allow_nan)
    check_tensor_digests(document, tensors, label)
    return Container(document, tensors)

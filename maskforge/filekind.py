"""What kind of file is this? Artifact, PyTorch export, checkpoint, ONNX model or image, from its bytes.

Commands that take one kind of file use it to say what a wrong file is instead of "not a safetensors
file" (`maskforge inspect model.onnx`). Only headers are read: the safetensors JSON header, the image
magic numbers, and for ONNX the protobuf message without its external data.

>>> file_kind("runs/demo/artifact.onnx").description         # doctest: +SKIP
'an ONNX model (a maskforge export: storage compact, precision fp32)'
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .errors import MaskforgeError
from .jsonread import strict_json

_MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024
_IMAGE_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
    (b"GIF8", "GIF"),
    (b"BM", "BMP"),
    (b"RIFF", "WebP"),
    (b"P5", "PGM"),
    (b"P6", "PPM"),
)
# safetensors metadata keys of maskforge's three safetensors formats (artifact.py, export.py, checkpoint.py)
_ARTIFACT_KEY, _TORCH_EXPORT_KEY, _CHECKPOINT_KEY = "maskforge", "maskforge_torch_export", "maskforge_checkpoint"


@dataclass(frozen=True)
class FileKind:
    """`kind` is one of: artifact, torch_export, checkpoint, safetensors, onnx, image, folder, missing, unknown."""

    kind: str
    description: str  # "an ONNX model (a maskforge export: ...)", for messages


def file_kind(path: str | os.PathLike) -> FileKind:
    """Recognize `path` from its first bytes (never raises for a readable path; `unknown` otherwise)."""
    path = Path(path)
    try:
        if not path.exists():
            return FileKind("missing", "missing")
        if path.is_dir():
            return FileKind("folder", "a folder")
    except OSError:  # a name too long, a symlink loop: the caller's loader says which
        return FileKind("unknown", "an unreadable path")
    try:
        with open(path, "rb") as handle:
            head = handle.read(16)
            safetensors = _safetensors_metadata(handle, head)
    except OSError:
        return FileKind("unknown", "an unreadable file")
    if safetensors is not None:
        return _safetensors_kind(safetensors)
    for magic, name in _IMAGE_MAGIC:
        if head.startswith(magic):
            return FileKind("image", f"a {name} image")
    # ModelProto field 1 (ir_version, a varint) comes first in the usual serializers: tag byte 0x08
    if head[:1] == b"\x08" or path.suffix.lower() == ".onnx":
        onnx_kind = _onnx_kind(path)
        if onnx_kind is not None:
            return onnx_kind
    return FileKind("unknown", "not a file maskforge recognizes")


def _safetensors_metadata(handle, head: bytes) -> dict | None:
    """The `__metadata__` map of a safetensors file (empty if none), or None if it is not one."""
    if len(head) < 10 or head[8:9] != b"{":
        return None
    length = int.from_bytes(head[:8], "little")
    if length > _MAX_SAFETENSORS_HEADER:
        return None
    handle.seek(8)
    try:
        # the one strict reader (duplicate keys, absurd nesting): a header it refuses is left to the
        # command's own loader, which says what is wrong with it
        header = strict_json(handle.read(length), str(handle.name), "the safetensors header")
    except MaskforgeError:
        return None
    if not isinstance(header, dict):
        return None
    metadata = header.get("__metadata__")
    return metadata if isinstance(metadata, dict) else {}


def _safetensors_kind(metadata: dict) -> FileKind:
    if _ARTIFACT_KEY in metadata:
        return FileKind("artifact", "a maskforge artifact")
    if _TORCH_EXPORT_KEY in metadata:
        return FileKind("torch_export", "a maskforge PyTorch export (a plain state dict)")
    if _CHECKPOINT_KEY in metadata:
        return FileKind("checkpoint", "a maskforge search checkpoint")
    return FileKind("safetensors", "a safetensors file without maskforge metadata")


def _onnx_kind(path: Path) -> FileKind | None:
    import onnx

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception:  # noqa: BLE001 - protobuf's DecodeError and friends: not ONNX after all
        return None
    if not proto.HasField("graph"):
        return None
    metadata = {prop.key: prop.value for prop in proto.metadata_props}
    if "maskforge.preprocessing" not in metadata:
        return FileKind("onnx", "an ONNX model (without maskforge metadata)")
    storage = metadata.get("maskforge.storage") or "unknown"
    precision = metadata.get("maskforge.precision") or "fp32"
    return FileKind("onnx", f"an ONNX model (a maskforge export: storage {storage}, precision {precision})")


def require_kind(path: str | os.PathLike, accepted: tuple[str, ...], wanted: str, hints: dict[str, str]) -> None:
    """Raise `MaskforgeError` saying what `path` is and what takes it (`hints`: kind -> text) when it is a
    kind listed in `hints` but not in `accepted`; other files are left to the caller's own loader, whose
    messages are more precise for damaged files of the right kind.

    >>> require_kind("m.onnx", ("artifact",), "an artifact", {"onnx": "`maskforge eval` takes it"})  # doctest: +SKIP
    MaskforgeError: m.onnx is an ONNX model (...), not an artifact: `maskforge eval` takes it
    """
    kind = file_kind(path)
    if kind.kind not in accepted and kind.kind in hints:
        raise MaskforgeError(f"{path} is {kind.description}, not {wanted}: {hints[kind.kind]}")

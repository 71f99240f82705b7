"""The `metadata_props` of maskforge's ONNX files: what ties a file to its artifact and how to feed it.

Written by `export_onnx`, read by `evaluate` and `verify` (and by anyone through onnxruntime's
`session.get_modelmeta().custom_metadata_map`). docs/DEPLOY.md lists every key.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from .. import __version__
from ..artifact import Artifact, artifact_bytes
from ..data import InputSpec
from ..errors import MaskforgeError, first_line
from ..jsonread import strict_json

META_PREFIX = "maskforge."


def with_digest(artifact: Artifact) -> Artifact:
    """An artifact built in memory (never saved) gets the digests and size its file would have."""
    if "document" not in artifact.document.get("digests", {}) or artifact.file_bytes is None:
        artifact.file_bytes = len(artifact_bytes(artifact))
    return artifact


def artifact_identity(artifact: Artifact) -> dict[str, str]:
    """The metadata_props values that tie an ONNX file to its source artifact (`verify` compares them)."""
    return {
        "artifact_digest": artifact.digest,
        "arch": artifact.arch,
        "arch_args": json.dumps(artifact.arch_args, sort_keys=True),
        "k": repr(float(artifact.k)),
        "seed": str(artifact.seed),
        "init": artifact.init,
        "scale_fan": json.dumps(bool(artifact.scale_fan)),
    }


def set_metadata(proto, artifact: Artifact, storage: str, precision: str, extra: dict[str, str] | None = None) -> None:
    """Replace the model's metadata_props with maskforge's entries (plus `extra`, already strings)."""
    spec = artifact.spec
    bn_values = sum(stat.numel() for stat in artifact.bn_stats.values())
    entries = {
        "version": __version__,
        "storage": storage,
        "precision": precision,
        **artifact_identity(artifact),
        "artifact_bytes": str(artifact.file_bytes if artifact.file_bytes is not None else ""),
        "preprocessing": json.dumps(
            {
                "layout": "NCHW",
                "channels": spec.channels,
                "height": spec.height,
                "width": spec.width,
                "scale": "1/255",
                "mean": list(spec.mean),
                "std": list(spec.std),
                "formula": "x = (pixel / 255 - mean[c]) / std[c]",
            },
            sort_keys=True,
        ),
        "class_names": json.dumps(list(spec.class_names)),
        "masked_weights": str(artifact.masked_weights),
        "kept_weights": str(artifact.kept_weights),
        "bn_values": str(bn_values),
        "provenance": json.dumps(artifact.document.get("provenance", {}), sort_keys=True),
        **(extra or {}),
    }
    del proto.metadata_props[:]
    for key, value in entries.items():
        prop = proto.metadata_props.add()
        prop.key, prop.value = META_PREFIX + key, value
    proto.producer_name, proto.producer_version = "maskforge", __version__
    proto.doc_string = (
        f"maskforge {artifact.arch} k={artifact.k} seed={artifact.seed} ({storage}, {precision}); "
        f"input {spec.channels}x{spec.height}x{spec.width} NCHW float32 normalized as "
        f"(pixel/255 - mean)/std; output: logits over {spec.num_classes} classes"
    )


@dataclass
class OnnxModelInfo:
    """What maskforge knows about an ONNX file from its `metadata_props` (None where absent)."""

    spec: InputSpec | None
    storage: str | None  # "dense" | "compact" | "regen"
    metadata: dict[str, str]

    @property
    def has_maskforge_metadata(self) -> bool:
        return self.spec is not None

    @property
    def precision(self) -> str | None:
        """ "fp32" or "int8"; files written before precisions existed are fp32."""
        if not self.has_maskforge_metadata:
            return None
        return self.metadata.get(META_PREFIX + "precision", "fp32")

    def get_int(self, key: str) -> int | None:
        value = self.metadata.get(META_PREFIX + key, "")
        return int(value) if value.strip().lstrip("-").isdigit() else None

    def get_json(self, key: str, default=None):
        try:
            return strict_json(self.metadata[META_PREFIX + key], "ONNX metadata", key)
        except (KeyError, MaskforgeError):
            return default


def read_onnx_metadata(proto_or_map) -> OnnxModelInfo:
    """Parse maskforge's `metadata_props` from an `onnx.ModelProto` or a plain {key: value} map."""
    if isinstance(proto_or_map, dict):
        metadata = dict(proto_or_map)
    else:
        metadata = {prop.key: prop.value for prop in proto_or_map.metadata_props}
    if META_PREFIX + "preprocessing" not in metadata:
        return OnnxModelInfo(None, None, metadata)
    try:
        # the one strict reader: a duplicate key or absurd nesting is "corrupt", not a RecursionError
        pre = strict_json(metadata[META_PREFIX + "preprocessing"], "preprocessing", "the JSON")
        names = strict_json(metadata.get(META_PREFIX + "class_names", "null"), "class_names", "the JSON")
        spec = InputSpec(pre["channels"], pre["height"], pre["width"], pre["mean"], pre["std"], names)
    except (ValueError, KeyError, TypeError, MaskforgeError) as exc:
        raise MaskforgeError(f"the model's maskforge metadata is corrupt ({first_line(exc)})") from None
    return OnnxModelInfo(spec, metadata.get(META_PREFIX + "storage"), metadata)

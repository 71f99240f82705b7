"""The artifact's JSON document (docs/FORMAT.md section 2.3), defined and validated here once.

`parse_artifact_document(raw, label)` checks the format name and version first (a newer version says
"upgrade maskforge"), then every field's type and range and the rules between fields. What needs the
architecture (layer shapes, kept counts, batch-norm names) is checked by `maskforge.artifact`.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import AfterValidator, Strict, model_validator

from .. import regen
from .base import Field, Flag, Hex64, Integer, Number, Text, check_format, parse, record, to_integer
from .spec import InputSpec

FORMAT_NAME = "maskforge-artifact"
FORMAT_VERSION = 1
METADATA_KEY = "maskforge"
MAX_SEED = 2**63 - 1
TOPK_RULES = ("layer", "global")

Distribution = Literal[regen.DISTRIBUTIONS]
TopkRule = Literal[TOPK_RULES]
Side = Annotated[Integer, Field(ge=1, le=8192)]


def _builder_args(values: dict) -> dict:
    from ..registry import check_builder_args

    try:
        return check_builder_args(values, "builder_args")
    except Exception as exc:  # MaskforgeError: pydantic reports ValueErrors with the field's location
        raise ValueError(str(exc).removeprefix("builder_args: ").removeprefix("builder_args ")) from None


@record(frozen=True, label="arch.args")
class ArchArgs:
    """What an architecture is built from, besides its name and k."""

    in_channels: Annotated[Integer, Field(ge=1, le=64, description="image channels")]
    num_classes: Annotated[Integer, Field(ge=1, le=1_000_000, description="outputs")]
    image_size: Annotated[tuple[Side, Side], Field(description="[height, width] in pixels")]
    width: Number = Field(
        1.0, gt=0, le=64, description="the paper's width multiplier; absent means 1 (and is not written at 1)"
    )
    builder_args: Optional[Annotated[dict[Text, Any], AfterValidator(_builder_args)]] = Field(
        None,
        description="a builder reference's JSON keyword arguments (--arch-args); absent for the "
        "registered architectures",
    )

    def to_dict(self) -> dict:
        """The keyword arguments of `archs.create_model` (no `width` at 1, as the document stores them)."""
        args = {"in_channels": self.in_channels, "num_classes": self.num_classes, "image_size": list(self.image_size)}
        if self.width != 1.0:
            args["width"] = self.width
        if self.builder_args:
            args["builder_args"] = dict(self.builder_args)
        return args


@record(frozen=True, label="arch")
class ArchSpec:
    name: Annotated[
        Text,
        Field(
            description="a registered architecture (`maskforge archs`) or a builder "
            "reference (torchvision:NAME, module:callable, file.py:callable)"
        ),
    ]
    args: ArchArgs
    library: Optional[Text] = Field(
        None,
        description="builder references: the code the network comes from and "
        "its version at search time ('torchvision 0.20.1')",
    )
    structure: Optional[list[Text]] = Field(
        None,
        description="builder references: the built model's parameters "
        "and buffers, one 'name param|buffer shape ModuleClass' each, in "
        "module order (FORMAT.md section 2.6)",
    )
    structure_digest: Optional[Hex64] = Field(None, description="SHA-256 of the structure lines joined by newlines")
    calls: Optional[list[Text]] = Field(
        None,
        description="builder references (since 0.3): the module calls of a forward pass, one "
        "'name ModuleClass output-shape' each, in the order they end (FORMAT.md section 2.6)",
    )
    calls_digest: Optional[Hex64] = Field(None, description="SHA-256 of the call lines joined by newlines")

    @model_validator(mode="after")
    def _structure(self) -> "ArchSpec":
        check_structure_record(self.structure, self.structure_digest)
        check_structure_record(self.calls, self.calls_digest, "calls")
        if self.calls is not None and self.structure is None:
            raise ValueError("calls come with a structure")
        return self


def check_structure_record(lines: list[str] | None, digest: str | None, what: str = "structure") -> None:
    """A recorded builder listing (artifact `arch`, checkpoint `identity`: the structure, or the calls)
    comes with its SHA-256."""
    if (lines is None) != (digest is None):
        raise ValueError(f"{what} and {what}_digest go together")
    if lines is not None:
        import hashlib

        if hashlib.sha256("\n".join(lines).encode("utf-8")).hexdigest() != digest:
            raise ValueError(f"{what}_digest is not the SHA-256 of the {what} lines")


@record(frozen=True, label="init")
class InitSpec:
    distribution: Annotated[Distribution, Field(description="weight distribution (FORMAT.md section 1.4)")]
    scale_fan: Annotated[Flag, Field(description="sigma from k * fan_in instead of fan_in")]


@record(frozen=True, label="generator")
class GeneratorSpec:
    id: Literal[regen.GENERATOR_ID]
    version: Annotated[Integer, Field(ge=regen.GENERATOR_VERSION, le=regen.GENERATOR_VERSION)]


@record(frozen=True, label="layer")
class LayerRecord:
    shape: Annotated[list[Annotated[Integer, Field(ge=1)]], Field(min_length=2, description="PyTorch weight shape")]
    kept: Annotated[Integer, Field(ge=1, description="weights kept (ones in the mask)")]
    density: Annotated[Number, Field(description="kept / product(shape), a binary64 quotient")]
    fan_in: Annotated[Integer, Field(description="product(shape[1:])")]

    @model_validator(mode="after")
    def _derived_fields(self) -> "LayerRecord":
        count = math.prod(self.shape)
        if self.kept > count:
            raise ValueError(f"kept {self.kept} exceeds the {count} weights of shape {self.shape}")
        if self.density != self.kept / count:
            raise ValueError(f"density {self.density!r} is not kept/weights = {self.kept / count!r}")
        if self.fan_in != regen.fan_in(self.shape):
            raise ValueError(f"fan_in {self.fan_in} does not match shape {self.shape}")
        return self


@record(frozen=True, label="digests")
class ArtifactDigests:
    weights: Annotated[dict[Text, Hex64], Field(description="per masked parameter: SHA-256 of its regenerated weights")]
    tensors: Annotated[dict[Text, Hex64], Field(description="per stored tensor: SHA-256 of its bytes as stored")]
    document: Annotated[Hex64, Field(description="SHA-256 of the canonical JSON of the document without `digests`")]


# Known provenance fields and what they hold; others may be added (free-form notes) if JSON scalars.
PROVENANCE_FIELDS: dict[str, str] = {
    "maskforge_version": "text",
    "torch_version": "text",
    "data": "text",
    "data_kind": "text",
    "epochs": "count",
    "steps": "count",
    "batch_size": "count",
    "processes": "count",
    "heldout_examples": "count",
    "lr": "amount",
    "heldout_acc": "fraction",
    "device": "text",
    "precision": "text",
    "channels_last": "flag",
    "masker": "text",
    "compile": "flag",
    "deterministic": "flag",
    "heldout_digest": "text",
}
_KIND_TEXT = {
    "text": "a string",
    "count": "a non-negative integer",
    "amount": "a non-negative number",
    "fraction": "a number in [0, 1]",
    "flag": "true or false",
}


def _fits(kind: str, value: Any) -> bool:
    if kind in ("text", "flag"):
        return isinstance(value, str if kind == "text" else bool)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        return False
    if kind == "count":
        try:
            return to_integer(value) == value
        except ValueError:
            return False
    return kind == "amount" or value <= 1


def _check_provenance(provenance: dict) -> dict:
    for key, value in provenance.items():
        kind = PROVENANCE_FIELDS.get(key)
        if value is not None and kind is not None and not _fits(kind, value):
            raise ValueError(f"provenance.{key} must be {_KIND_TEXT[kind]} or null, got {value!r}")
    return provenance


Scalar = Union[Flag, Annotated[int, Strict()], Annotated[float, Strict(), Field(allow_inf_nan=False)], Text, None]
Provenance = Annotated[dict[Text, Scalar], AfterValidator(_check_provenance)]


@record(frozen=True, label="artifact")
class ArtifactDocument:
    """The JSON document stored under the safetensors metadata key `maskforge`."""

    format: Literal[FORMAT_NAME]
    format_version: Annotated[Integer, Field(ge=FORMAT_VERSION, le=FORMAT_VERSION)]
    arch: ArchSpec
    input: InputSpec
    seed: Annotated[Integer, Field(ge=0, le=MAX_SEED, description="the generator seed")]
    init: InitSpec
    k: Annotated[Number, Field(gt=0, le=1, description="fraction of weights kept")]
    generator: GeneratorSpec
    layers: Annotated[dict[Text, LayerRecord], Field(min_length=1, description="per masked parameter")]
    bn: Annotated[list[Text], Field(description="batch-norm module names, sorted, distinct")]
    provenance: Annotated[Provenance, Field(description="how the artifact was made (no timestamps)")]
    digests: ArtifactDigests
    topk: TopkRule = Field(
        "layer",
        description="'layer': the kept-count rule in every layer (absent: the "
        "default); 'global': one threshold over all layers",
    )

    @model_validator(mode="after")
    def _consistent(self) -> "ArtifactDocument":
        args, spec = self.arch.args, self.input
        if (spec.channels, [spec.height, spec.width], spec.num_classes) != (
            args.in_channels,
            list(args.image_size),
            args.num_classes,
        ):
            raise ValueError(
                f"input ({spec.channels} channel(s), {spec.height}x{spec.width}, "
                f"{spec.num_classes} class names) does not match arch.args ({args.in_channels} "
                f"channel(s), {args.image_size[0]}x{args.image_size[1]}, {args.num_classes} classes)"
            )
        if self.bn != sorted(set(self.bn)):
            raise ValueError("bn must be a sorted list of distinct batch-norm module names")
        if set(self.digests.weights) != set(self.layers):
            raise ValueError("digests.weights must list exactly the masked layers")
        return self


def parse_artifact_document(raw: Any, label: str) -> ArtifactDocument:
    """Validate a parsed document: format and version first, then every field (docs/FORMAT.md 2.3-2.4)."""
    check_format(raw, FORMAT_NAME, FORMAT_VERSION, label, "artifact")
    return parse(ArtifactDocument, raw, label)

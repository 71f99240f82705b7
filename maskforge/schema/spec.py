"""The input spec: what a model expects as input, stored in artifacts and ONNX exports."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import model_validator

from .base import Field, Integer, Number, Text, dump, parse, record

PositiveNumber = Annotated[Number, Field(gt=0)]


@record(frozen=True, label="input spec")
class InputSpec:
    """Shape, normalization and the meaning of the outputs.

    `mean` and `std` are per channel, in [0, 1] pixel units (pixels are divided by 255 first).

    >>> spec = InputSpec(1, 28, 28, (0.13,), (0.31,), tuple("0123456789"))
    >>> InputSpec.from_dict(spec.to_dict()) == spec, spec.num_classes
    (True, 10)
    """

    channels: Annotated[Integer, Field(gt=0, description="image channels (1 gray, 3 RGB)")]
    height: Annotated[Integer, Field(gt=0, description="image height in pixels")]
    width: Annotated[Integer, Field(gt=0, description="image width in pixels")]
    mean: Annotated[tuple[Number, ...], Field(description="per-channel mean of pixel/255, subtracted first")]
    std: Annotated[tuple[PositiveNumber, ...], Field(description="per-channel std of pixel/255, divided by next")]
    class_names: Annotated[tuple[Text, ...], Field(min_length=1, description="output i is class_names[i]")]

    @model_validator(mode="after")
    def _one_value_per_channel(self) -> "InputSpec":
        for name in ("mean", "std"):
            if len(getattr(self, name)) != self.channels:
                raise ValueError(f"{name} has {len(getattr(self, name))} values for {self.channels} channel(s)")
        return self

    @property
    def num_classes(self) -> int:
        """Number of classes (outputs of the model)."""
        return len(self.class_names)

    def to_dict(self) -> dict:
        """A JSON-able dict (lists, not tuples)."""
        return dump(self)

    @classmethod
    def from_dict(cls, d: Any) -> "InputSpec":
        """Build a spec from `to_dict` output, raising `MaskforgeError` on missing, extra or bad fields."""
        return parse(cls, d, "input spec")

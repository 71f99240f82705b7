"""The images an int8 export calibrates on (training split) and is checked on (held-out split).

By default they come from the data set the artifact was searched on (its provenance); any source
`maskforge search` accepts can be given instead. The data must match the network: channels, image
size (image folders are resized) and classes. `matching_splits` and `searched_data` are that check and
that default, for every command that feeds a model data (`eval` and `compare` too).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..artifact import Artifact
from ..data import DataSplits, InputSpec, is_named, load_data, normalize
from ..errors import MaskforgeError

DEFAULT_CHECK_IMAGES = 1000  # held-out images the int8 file is compared with fp32 on
CALIBRATION_BATCH = 32


@dataclass
class CheckImages:
    """Normalized float32 images: `calibration` (training split) and `heldout` with its labels."""

    source: str
    calibration: np.ndarray
    heldout: np.ndarray
    labels: np.ndarray
    # The fp32 network's logits on `heldout`, per opset, once computed: exports of one artifact that
    # share these images (eval --compare's int8 modes) compute them once.
    reference_logits: dict = field(default_factory=dict)


def check_calibration_count(calibration) -> int:
    if isinstance(calibration, bool) or not isinstance(calibration, (int, np.integer)) or calibration < 1:
        raise MaskforgeError(f"calibration must be a positive number of images, got {calibration!r}")
    return int(calibration)


def load_check_images(
    artifact: Artifact, source: str | None, calibration: int, heldout: int = DEFAULT_CHECK_IMAGES
) -> CheckImages:
    """Load `calibration` training and up to `heldout` held-out images of `source` (or the artifact's data)."""
    calibration = check_calibration_count(calibration)
    if isinstance(heldout, bool) or not isinstance(heldout, int) or heldout < 1:
        raise MaskforgeError(f"check_images must be a positive number of images, got {heldout!r}")
    provenance = artifact.document.get("provenance", {})
    source = source or searched_data(provenance, "--data (Python: Int8Options(data=...))")
    if not source:
        raise MaskforgeError(
            "the artifact does not name the data it was searched on; give --data (Python: Int8Options(data=...))"
        )
    splits = matching_splits(artifact.spec, source, "calibration data")
    if len(splits.train) == 0 or len(splits.heldout) == 0:
        raise MaskforgeError(
            f"calibration data {source} needs training and held-out images; it has "
            f"{len(splits.train)} and {len(splits.heldout)}"
        )
    spec = artifact.spec
    calibration_images = _images(splits.train, _spread(len(splits.train), calibration), spec)
    indices = list(range(min(heldout, len(splits.heldout))))
    labels = splits.heldout.labels[torch.as_tensor(indices)].numpy().astype(np.int64)  # no image decoded
    return CheckImages(source, calibration_images, _images(splits.heldout, indices, spec), labels)


def matching_splits(
    spec: InputSpec, source: str, what: str = "data", *, check_names: bool = True, check_classes: bool = True
) -> DataSplits:
    """`load_data(source)`, refused with one clear message unless it fits a model of input `spec`
    (channels, size after resizing image folders, classes and, with `check_names`, class names).
    `check_classes=False`: the model does not say how many classes it predicts (a foreign ONNX graph)."""
    splits = load_data(source)
    if splits.kind == "imagefolder" and (splits.spec.height, splits.spec.width) != (spec.height, spec.width):
        if spec.height != spec.width:
            raise MaskforgeError(
                f"the model takes {spec.height}x{spec.width} images; image folders are resized to squares only"
            )
        splits = load_data(source, image_size=spec.height)
    got = splits.spec
    if got.channels != spec.channels:
        raise MaskforgeError(f"{what} {source} has {got.channels}-channel images, the model takes {spec.channels}")
    if (got.height, got.width) != (spec.height, spec.width):
        raise MaskforgeError(
            f"{what} {source} has {got.height}x{got.width} images, the model takes {spec.height}x{spec.width}"
        )
    if check_classes and got.num_classes != spec.num_classes:
        raise MaskforgeError(f"{what} {source} has {got.num_classes} classes, the model predicts {spec.num_classes}")
    if check_classes and check_names and tuple(got.class_names) != tuple(spec.class_names):
        raise MaskforgeError(
            f"{what} {source} has classes {_names(got.class_names)}, the model was searched on "
            f"{_names(spec.class_names)}"
        )
    return splits


def searched_data(provenance: dict, option: str) -> str | None:
    """The data set a model was searched on, from its provenance (None when not recorded); a folder that
    is not on this machine is refused, naming the `option` that gives other data."""
    source = provenance.get("data") if isinstance(provenance, dict) else None
    if not source:
        return None
    if is_named(source):
        return source  # loading it says where to get it when this machine lacks it
    if not Path(source).expanduser().exists():
        raise MaskforgeError(f"the model was searched on {source}, which is not on this machine; give {option}")
    return source


def calibration_reader(images: np.ndarray, input_name: str):
    """An onnxruntime.quantization CalibrationDataReader over `images`, CALIBRATION_BATCH at a time."""
    from onnxruntime.quantization import CalibrationDataReader

    class _Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(
                [{input_name: images[i : i + CALIBRATION_BATCH]} for i in range(0, len(images), CALIBRATION_BATCH)]
            )

        def get_next(self):
            return next(self.batches, None)

    return _Reader()


def _spread(length: int, count: int) -> list[int]:
    """`count` indices spread evenly over `range(length)` (all of them when count >= length)."""
    if count >= length:
        return list(range(length))
    return sorted({int(i) for i in np.linspace(0, length - 1, count).round()})


def _images(dataset, indices: Sequence[int], spec: InputSpec) -> np.ndarray:
    batch = torch.stack([dataset[i][0] for i in indices])
    return normalize(batch, spec).numpy()


def _names(names: Sequence[str]) -> str:
    return ", ".join(names[:6]) + (" ..." if len(names) > 6 else "")

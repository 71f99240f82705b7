"""Classify image files with an artifact (PyTorch, materialized) or an ONNX export (onnxruntime).

Images are decoded exactly as the data loader decodes an image folder's held-out images (`ImageFileDataset`:
converted to the model's channels, shorter side resized to the model's size, center crop) and normalized
with the model's input spec (`normalize`), so a file from a held-out folder gets the prediction `eval`
counted for it. Probabilities are the softmax of the logits.

>>> for p in predict("runs/demo/artifact.onnx", ["seven.png"]):            # doctest: +SKIP
...     print(p.image, [(c.name, round(c.probability, 3)) for c in p.top])
seven.png [('7', 0.981), ('9', 0.011), ('2', 0.004), ('1', 0.002), ('3', 0.001)]
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .data import IMAGE_EXTENSIONS, ImageFileDataset, list_image_files, normalize
from .errors import MaskforgeError
from .fileio import missing_reason
from .evaluation.runners import OnnxRunner, TorchRunner, torch_threads
from .evaluation.scoring import top_k
from .evaluation.subject import open_model
from .materialization import materialize
from .memory import check_network_fits

TOP = 5


@dataclass
class ClassScore:
    """One of an image's most probable classes."""

    rank: int
    index: int
    name: str
    probability: float
    logit: float


@dataclass
class Prediction:
    """The `top` most probable classes of one image, best first; for an image that could not be decoded
    (`predict(..., skip_bad=True)`), no classes and the `error`."""

    image: str
    top: list[ClassScore]
    error: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64 (shifted by the row maximum, so large logits do not overflow)."""
    shifted = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


def image_files(images: Sequence[str | os.PathLike]) -> list[Path]:
    """The files `images` names: files as given, folders replaced by the image files under them
    (recursively, sorted as image folders are; hidden names skipped; symbolic link loops refused)."""
    files: list[Path] = []
    for image in map(Path, images):
        if image.is_dir():
            found = list_image_files(image)
            if not found:
                raise MaskforgeError(f"folder {image} contains no images ({', '.join(IMAGE_EXTENSIONS)})")
            files += found
        elif not image.is_file():
            raise MaskforgeError(f"image {image} {missing_reason(image)}")
        else:
            files.append(image)
    return files


def predict(
    model: str | os.PathLike,
    images: Sequence[str | os.PathLike],
    *,
    top: int = TOP,
    threads: int | None = None,
    batch_size: int = 32,
    mean: Sequence[float] | str | None = None,
    std: Sequence[float] | str | None = None,
    size: int | None = None,
    skip_bad: bool = False,
) -> list[Prediction]:
    """The `top` (at most the number of classes) most probable classes of each image, in input order.

    `images` are files or folders (every image under a folder, see `image_files`). An image that cannot
    be decoded raises `MaskforgeError`, or with `skip_bad` gets a `Prediction` with its `error` and no
    classes while the others are classified (when none can be decoded, the error is raised all the same).
    """
    if isinstance(top, bool) or not (isinstance(top, int) and top >= 1):
        raise MaskforgeError(f"top must be a positive integer, got {top!r}")
    if not images:
        raise MaskforgeError("no images given")
    files = image_files(images)
    subject = open_model(model, mean=mean, std=std, size=size)
    spec = subject.spec
    if spec.height != spec.width or spec.channels not in (1, 3):
        raise MaskforgeError(
            f"the model takes {spec.channels}x{spec.height}x{spec.width} inputs; images are "
            f"decoded to square 1- or 3-channel inputs only (as image folders are)"
        )
    threads = threads or os.cpu_count() or 1
    if subject.artifact is not None:
        network = materialize(subject.artifact, threads=threads)
        check_network_fits(
            network,
            spec,
            min(batch_size, len(files)),
            f"predicting with {model}",
            "give fewer images at once (Python: batch_size=1)",
        )
        runner: TorchRunner | OnnxRunner = TorchRunner(network)
    else:
        runner = OnnxRunner(subject, threads)
    dataset = ImageFileDataset(files, [0] * len(files), spec.channels, spec.height)
    names = list(spec.class_names) if subject.classes_known else None  # else: the output's width, by index
    out: list[Prediction | None] = [None] * len(files)
    errors: list[MaskforgeError] = []
    with torch_threads(threads):
        for start in range(0, len(files), batch_size):
            decoded: list[tuple[int, torch.Tensor]] = []
            for index in range(start, min(start + batch_size, len(files))):
                try:  # one image at a time: a corrupt file costs its own prediction, not its batch's
                    decoded.append((index, dataset[index][0]))
                except MaskforgeError as exc:
                    if not skip_bad:
                        raise
                    errors.append(exc)
                    out[index] = Prediction(str(files[index]), [], str(exc))
            if not decoded:
                continue
            logits = runner(normalize(torch.stack([image for _, image in decoded]), spec).numpy())
            if logits.ndim != 2 or (names is not None and logits.shape[1] != len(names)):
                raise MaskforgeError(
                    f"the model's output has shape {list(logits.shape)}, expected "
                    f"[batch, {len(names) if names else 'classes'}]"
                )
            names = names or [str(index) for index in range(logits.shape[1])]
            probabilities = softmax(logits)
            for row, classes in enumerate(top_k(logits, min(top, len(names)))):
                scores = [
                    ClassScore(rank + 1, int(c), names[c], float(probabilities[row, c]), float(logits[row, c]))
                    for rank, c in enumerate(classes)
                ]
                index = decoded[row][0]
                out[index] = Prediction(str(files[index]), scores)
    if len(errors) == len(files):  # nothing to show: the error itself says more than "none could be decoded"
        raise (
            errors[0]
            if len(files) == 1
            else MaskforgeError(f"none of the {len(files)} images could be decoded; the first: {errors[0]}")
        )
    return [prediction for prediction in out if prediction is not None]

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

from .data import ImageFileDataset, iterate_batches, normalize
from .errors import MaskforgeError
from .evaluation.runners import OnnxRunner, TorchRunner, torch_threads
from .evaluation.scoring import top_k
from .evaluation.subject import open_model
from .materialization import materialize

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
    """The `top` most probable classes of one image, best first."""

    image: str
    top: list[ClassScore]

    def to_dict(self) -> dict:
        return asdict(self)


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64 (shifted by the row maximum, so large logits do not overflow)."""
    shifted = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


def predict(model: str | os.PathLike, images: Sequence[str | os.PathLike], *, top: int = TOP,
            threads: int | None = None, batch_size: int = 32, mean: Sequence[float] | str | None = None,
            std: Sequence[float] | str | None = None, size: int | None = None) -> list[Prediction]:
    """The `top` (at most the number of classes) most probable classes of each image, in input order."""
    if isinstance(top, bool) or not (isinstance(top, int) and top >= 1):
        raise MaskforgeError(f"top must be a positive integer, got {top!r}")
    if not images:
        raise MaskforgeError("no images given")
    files = [Path(image) for image in images]
    for file in files:
        if not file.is_file():
            raise MaskforgeError(f"image {file} {'is a folder' if file.is_dir() else 'does not exist'}")
    subject = open_model(model, mean=mean, std=std, size=size)
    spec = subject.spec
    if spec.height != spec.width or spec.channels not in (1, 3):
        raise MaskforgeError(f"the model takes {spec.channels}x{spec.height}x{spec.width} inputs; images are "
                             f"decoded to square 1- or 3-channel inputs only (as image folders are)")
    threads = threads or os.cpu_count() or 1
    runner = (TorchRunner(materialize(subject.artifact, threads=threads)) if subject.artifact is not None
              else OnnxRunner(subject, threads))
    dataset = ImageFileDataset(files, [0] * len(files), spec.channels, spec.height)
    names = list(spec.class_names) if subject.classes_known else None   # else: the output's width, by index
    out: list[Prediction] = []
    with torch_threads(threads):
        for batch, _ in iterate_batches(dataset, batch_size, shuffle=False):
            logits = runner(normalize(batch, spec).numpy())
            if logits.ndim != 2 or (names is not None and logits.shape[1] != len(names)):
                raise MaskforgeError(f"the model's output has shape {list(logits.shape)}, expected "
                                     f"[batch, {len(names) if names else 'classes'}]")
            names = names or [str(index) for index in range(logits.shape[1])]
            probabilities = softmax(logits)
            for row, classes in enumerate(top_k(logits, min(top, len(names)))):
                scores = [ClassScore(rank + 1, int(c), names[c], float(probabilities[row, c]), float(logits[row, c]))
                          for rank, c in enumerate(classes)]
                out.append(Prediction(str(files[len(out)]), scores))
    return out

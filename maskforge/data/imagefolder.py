"""Image folders: ``ROOT/train/<class>/*.png|jpg|...`` plus ``ROOT/val/`` (or ``ROOT/test/``).

Files are listed in torchvision's `make_dataset` order (sorted, recursive, symlinks followed; hidden files
and folders skipped; symbolic link loops and files reached twice refused: `_Walk`) and decoded with PIL
on access, with decompression-bomb protection; resizing uses torchvision's `resize` + `center_crop`.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torchvision.transforms.v2.functional as F
from PIL import Image

from ..errors import MaskforgeError
from ..schema import InputSpec
from .datasets import DataSplits, ImageDataset, channel_histograms, mean_std

#: File name suffixes (case-insensitive) that an image folder may contain.
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".ppm", ".pgm")

#: PIL's own default; we enforce it ourselves so a caller who set `Image.MAX_IMAGE_PIXELS = None` elsewhere
#: does not silently turn a decompression bomb into an out-of-memory crash in a data loader worker.
MAX_IMAGE_PIXELS = 89_478_485


class ImageFileDataset(ImageDataset):
    """Image files decoded with PIL on access, converted to `channels` (1: "L", 3: "RGB") and `size` x `size`.

    Decoding resizes the shorter side to `size` (bilinear) and then center-crops `size` x `size`; an image
    already `size` x `size` is left untouched. A corrupt or oversized image raises `MaskforgeError` naming
    the file.
    """

    def __init__(
        self, files: Sequence[Path], labels: Sequence[int], channels: int, size: int, root: Path | None = None
    ) -> None:
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
        self.root = root  # the split's folder (the files' paths relative to it identify the split)
        # With skip_bad, an image that cannot be decoded is returned as zeros with label -1 (for the caller to
        # drop) and its error recorded here, by index: `eval` counts the others and names these.
        self.skip_bad = False
        self.unreadable: dict[int, str] = {}

    @property
    def item_shape(self) -> tuple[int, int, int]:
        return (self.channels, self.size, self.size)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        try:
            return _decode_image(self.files[index], self.channels, self.size), int(self.labels[index])
        except MaskforgeError as exc:
            if not self.skip_bad:
                raise
            self.unreadable[index] = str(exc)
            return torch.zeros(self.item_shape, dtype=torch.uint8), -1


_SAMPLE_FOR_CHANNELS = 32
_SAMPLE_FOR_STATS = 256
_GRAY_MODES = ("1", "L", "LA")
_EXTENSIONS_TEXT = ", ".join(IMAGE_EXTENSIONS)


def load_image_folder(root: Path, image_size: int | None) -> DataSplits:
    """Train/held-out splits of an image folder; `image_size` (default: see `_default_size`) sets the side."""
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
    if image_size is not None:
        size, why = image_size, "as image_size asks"
    else:
        size, why = _default_size(train_files[0])
    train = ImageFileDataset(train_files, train_labels, channels, size, root / "train")
    heldout = ImageFileDataset(heldout_files, heldout_labels, channels, size, heldout_dir)
    mean, std = mean_std(_sample_histograms(train))
    spec = InputSpec(channels, size, size, mean, std, tuple(class_names))
    note = f"image folder {root}: images are decoded at {size}x{size} {'gray' if channels == 1 else 'RGB'}, {why}"
    return DataSplits(str(root), "imagefolder", train, heldout, spec, augment=True, notes=[note])


def _class_folders(split_dir: Path) -> list[str]:
    """Sorted names of the (non-hidden) subfolders: the class names, in label order."""
    return sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))


def _list_images(
    split_dir: Path, class_names: Sequence[str], *, require_every_class: bool
) -> tuple[list[Path], list[int]]:
    """All image files under split_dir/<class>/ (recursively), sorted so the order is the same everywhere."""
    walk = _Walk()
    files: list[Path] = []
    labels: list[int] = []
    for label, name in enumerate(class_names):
        if (split_dir / name).is_dir():
            found = walk.images(split_dir / name)
            files += found
            labels += [label] * len(found)
        if require_every_class and label not in labels[-1:]:
            raise MaskforgeError(f"class folder {split_dir / name} contains no images ({_EXTENSIONS_TEXT})")
    return files, labels


def list_image_files(folder: Path) -> list[Path]:
    """The image files under `folder` (recursively, symbolic links followed, hidden names skipped), in
    torchvision's `make_dataset` order; a symbolic link loop or a file reached twice is refused."""
    return _Walk().images(Path(folder))


class _Walk:
    """Lists image files as torchvision's `make_dataset` does (folders in sorted path order, files sorted
    by name within each), following symbolic links, but refusing what `os.walk(followlinks=True)` does
    not see: a link back up the tree (one `..` link repeats the tree until the OS gives up, 40 levels
    deep; two of them make the walk exponential, which looks like a hang), and a folder or file reached
    twice (its images would count twice, or under two classes). Identity is the resolved path. One
    `_Walk` spans the class folders of a split, so a file linked into two classes is caught too."""

    def __init__(self) -> None:
        self._folders: dict[str, str] = {}  # resolved folder -> the path it was first reached by
        self._files: dict[str, str] = {}  # resolved image file -> the path it was first reached by

    def images(self, top: Path) -> list[Path]:
        found: list[tuple[str, list[str]]] = []
        self._visit(str(top), os.path.realpath(top), (), found)
        return [Path(os.path.join(folder, name)) for folder, names in sorted(found) for name in sorted(names)]

    def _visit(self, folder: str, real: str, ancestors: tuple[str, ...], found: list) -> None:
        if ancestors and (real in ancestors or _inside(ancestors[-1], real)):
            # a link to a folder that holds this one: walking it comes back here, again and again
            raise MaskforgeError(
                f"symbolic link loop: {folder} leads back to {real}, which contains it; remove "
                f"the link (image folders are walked through links, and this one never ends)"
            )
        if real in self._folders:
            raise MaskforgeError(
                f"{folder} and {self._folders[real]} are the same folder (through a symbolic "
                f"link): its images would count twice; remove one"
            )
        self._folders[real] = folder
        try:
            entries = sorted(os.scandir(folder), key=lambda entry: entry.name)
        except OSError as exc:
            raise MaskforgeError(f"cannot list the image folder {folder}: {exc.strerror or exc}") from None
        names = []
        for entry in entries:
            if entry.name.startswith("."):
                continue  # hidden files and folders (.DS_Store, .ipynb_checkpoints) are not images
            if _is_dir(entry):
                self._visit(entry.path, os.path.realpath(entry.path), (*ancestors, real), found)
            elif entry.name.lower().endswith(IMAGE_EXTENSIONS):
                # a plain file's resolved path is its folder's plus its name; only links need resolving
                resolved = os.path.realpath(entry.path) if entry.is_symlink() else os.path.join(real, entry.name)
                if resolved in self._files:
                    raise MaskforgeError(
                        f"{entry.path} and {self._files[resolved]} are the same file (through a "
                        f"symbolic link): it would count twice; remove one"
                    )
                self._files[resolved] = entry.path
                names.append(entry.name)
        found.append((folder, names))


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()  # follows links, as os.walk(followlinks=True) does
    except OSError:
        return False  # a link that loops on itself: listed as a file, refused when decoded


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


def _default_size(first: Path) -> tuple[int, str]:
    """Small images (max side <= 64) keep their size; anything larger is decoded at 224 (ImageNet style).
    Returns (side, why)."""
    with _open_image(first) as image:
        width, height = image.size
    side = max(width, height)
    if side <= 64:
        return side, (
            f"the size of its first training image {first.name} ({width}x{height}; images of at most "
            f"64 px keep their size); set image_size to choose another"
        )
    return 224, (
        f"ImageNet style, because its first training image {first.name} is {width}x{height}, larger than "
        f"64 px; set image_size to choose another"
    )


def _sample_histograms(dataset: ImageFileDataset) -> np.ndarray:
    hist = np.zeros((dataset.channels, 256), dtype=np.int64)
    for index in _evenly_spaced(len(dataset), _SAMPLE_FOR_STATS):
        hist += channel_histograms(dataset[index][0].numpy()[None])
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
        raise MaskforgeError(f"refusing to decode image {path}: {width}x{height} exceeds {MAX_IMAGE_PIXELS} pixels")
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
                # torchvision's Resize(size) + CenterCrop(size) arithmetic; an image of the right size is kept
                image = F.center_crop(F.resize(image, [size], interpolation=F.InterpolationMode.BILINEAR), [size, size])
                array = np.array(image, dtype=np.uint8)
        except Exception as exc:  # truncated or corrupt data surfaces only when pixels are decoded
            raise MaskforgeError(f"cannot decode image {path}: {type(exc).__name__}: {exc}") from None
    tensor = torch.from_numpy(array)
    return tensor[None] if channels == 1 else tensor.permute(2, 0, 1).contiguous()

"""Data sets: the built-in demo set, CIFAR-10 and MNIST folders, image folders; splits and batching.

Everything here hands out **uint8** images `[C, H, W]` and integer labels. Normalization and augmentation
are separate, batch-level functions (`normalize`, `augment_batch`) so that they can run on the GPU, after
the cheap uint8 copy, and so that an exported model can document exactly what it expects.

Sources accepted by `load_data(source)` (one module each):

1. ``"mnist5k"`` (default; demo.py): the 5,000-image MNIST sample vendored with maskforge; row ``i`` is
   held out iff ``i % 5 == 4``: 4,000 train / 1,000 held-out images, 100 held-out per digit.
2. ``"fashion-mnist"`` (named.py finds it; mnist.py reads it): Fashion-MNIST's IDX files where Debian's
   ``dataset-fashion-mnist`` installs them or under ``$MASKFORGE_DATA``; held-out = the 10,000 test images.
3. A CIFAR-10 folder (cifar.py): ``cifar-10-batches-py`` (python pickles, read with a restricted
   unpickler) or ``cifar-10-batches-bin`` (binary records), or a folder containing one of them.
4. An MNIST / Fashion-MNIST folder in torchvision's layout (mnist.py): ``ROOT/MNIST/raw/*-ubyte[.gz]``;
   ROOT, ``ROOT/MNIST`` or the ``raw`` folder itself, or a folder holding the IDX files. Held-out = t10k.
5. An image folder (imagefolder.py): ``ROOT/train/<class>/*.png|jpg|...`` plus ``ROOT/val/`` (or
   ``ROOT/test/``).

Batching (sampling.py, `iterate_batches`) is a pure function of (seed, epoch, rank, world size, start
batch), which is what makes a search reproducible and resumable mid-epoch:

>>> splits = load_data("mnist5k")                                   # doctest: +SKIP
>>> for x, y in iterate_batches(splits.train, 128, shuffle=True, seed=0, epoch=3):   # doctest: +SKIP
...     logits = model(normalize(x.cuda(), splits.spec))
"""

from __future__ import annotations

import logging
from pathlib import Path

from ..errors import MaskforgeError
from ..fileio import missing_reason
from ..schema import InputSpec
from .cifar import find_cifar10
from .datasets import DataSplits, ImageDataset, InMemoryImages, heldout_fingerprint, split_warnings
from .demo import load_mnist5k
from .imagefolder import IMAGE_EXTENSIONS, ImageFileDataset, list_image_files, load_image_folder
from .mnist import find_mnist_raw, load_mnist_raw
from .named import FASHION_MNIST, NAMED_SOURCES, fashion_mnist_folder, is_named
from .sampling import derive_seed, iterate_batches, num_batches
from .transforms import augment_batch, normalize

__all__ = [
    "load_data",
    "DataSplits",
    "ImageDataset",
    "InMemoryImages",
    "ImageFileDataset",
    "InputSpec",
    "iterate_batches",
    "num_batches",
    "derive_seed",
    "normalize",
    "augment_batch",
    "IMAGE_EXTENSIONS",
    "heldout_fingerprint",
    "split_warnings",
    "check_heldout_data",
    "NAMED_SOURCES",
    "is_named",
    "list_image_files",
]

ACCEPTED_SOURCES = (
    "expected one of: 'mnist5k' (the built-in demo set); 'fashion-mnist' (Debian's dataset-fashion-mnist "
    "or $MASKFORGE_DATA); a CIFAR-10 folder (cifar-10-batches-py, "
    "cifar-10-batches-bin, or a folder containing one of them); an MNIST/Fashion-MNIST folder in "
    "torchvision's layout (ROOT/MNIST/raw/*-ubyte[.gz], ROOT/MNIST, the raw folder or a folder of the IDX "
    "files); "
    "an image folder ROOT/train/<class>/*.png|jpg|... with ROOT/val/ or ROOT/test/"
)


def load_data(source: str = "mnist5k", *, image_size: int | None = None) -> DataSplits:
    """Load a data source (see the module docstring for the accepted forms) into train/held-out splits.

    `image_size` sets the side of image-folder images; for the fixed-size sources (mnist5k,
    fashion-mnist, MNIST, CIFAR-10) it must be left out or equal the native size.

    >>> splits = load_data("mnist5k")
    >>> len(splits.train), len(splits.heldout), splits.spec.num_classes
    (4000, 1000, 10)
    """
    valid_size = isinstance(image_size, int) and not isinstance(image_size, bool) and image_size > 0
    if image_size is not None and not valid_size:
        raise MaskforgeError(f"image size must be a positive integer, got {image_size!r}")
    if str(source) == "mnist5k":
        splits = load_mnist5k()
    elif str(source) == FASHION_MNIST:
        splits = load_mnist_raw(fashion_mnist_folder(), name=FASHION_MNIST, fashion=True)
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
        raise MaskforgeError(f"data source {path} {missing_reason(path)}; {ACCEPTED_SOURCES}")
    if not path.is_dir():
        raise MaskforgeError(f"data source {path} is not a folder; {ACCEPTED_SOURCES}")
    cifar = find_cifar10(path)
    if cifar is not None:
        loader, folder = cifar
        return loader(folder)
    raw = find_mnist_raw(path)
    if raw is not None:
        return load_mnist_raw(raw)
    if (path / "train").is_dir():
        return load_image_folder(path, image_size)
    raise MaskforgeError(f"data source {path} is not a recognized data folder; {ACCEPTED_SOURCES}")


def check_heldout_data(provenance: dict, splits: DataSplits, source: str) -> bool:
    """Whether `splits` holds the held-out data a model was searched with (its provenance's
    `heldout_digest`); if it does not, log a warning that says so (and True where nothing is recorded)."""
    recorded = provenance.get("heldout_digest")
    if not recorded:
        return True
    found = heldout_fingerprint(splits)
    if found == recorded:
        return True
    logging.getLogger(__name__).warning(
        "the held-out data of %s differ from those the model was searched with (%s; held-out digest %s..., "
        "now %s...): its accuracy here is not comparable with the search's",
        source,
        provenance.get("data", "unknown data"),
        recorded[:12],
        found[:12],
    )
    return False

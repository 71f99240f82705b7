"""Named data sources: data sets that `--data NAME` finds by themselves, wherever they live on a machine.

* ``mnist5k``: the demo set shipped inside the package (demo.py).
* ``fashion-mnist``: Fashion-MNIST (60,000 train / 10,000 test 28x28 images, 10 classes) as its four IDX
  files, found in this order:

  1. ``$MASKFORGE_DATA/fashion-mnist``, ``$MASKFORGE_DATA/FashionMNIST`` (each may hold the files or a
     ``raw/`` folder with them), or ``$MASKFORGE_DATA`` itself;
  2. where Debian's package ``dataset-fashion-mnist`` installs them (``/usr/share/datasets/fashion-mnist``).

  Nothing is ever downloaded: when the files are nowhere, the error says how to get them.

A named source is recorded by its name (in config.json and the artifact's provenance), not by the folder
it was found in, so `eval --data fashion-mnist` and a sweep mean the same data set on every machine. This
module imports neither torch nor numpy: the search planner asks it whether a source is named.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import MaskforgeError

BUILTIN = "mnist5k"
FASHION_MNIST = "fashion-mnist"
NAMED_SOURCES = (BUILTIN, FASHION_MNIST)

DATA_ENV = "MASKFORGE_DATA"
# Where Debian's `dataset-fashion-mnist` puts the files (`dpkg -L dataset-fashion-mnist`). A module-level
# tuple so that tests can point it at a folder of their own (or at nothing).
SYSTEM_FOLDERS: tuple[str, ...] = ("/usr/share/datasets/fashion-mnist",)

_IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def is_named(source: object) -> bool:
    """Whether `source` names a data set (rather than a folder)."""
    return str(source) in NAMED_SOURCES


def fashion_mnist_folder() -> Path:
    """The folder holding Fashion-MNIST's four IDX files (``.gz`` or not), searched as the module says.

    >>> fashion_mnist_folder()   # doctest: +SKIP
    PosixPath('/usr/share/datasets/fashion-mnist')
    """
    tried = []
    for folder in _candidates():
        tried.append(str(folder))
        for place in (folder, folder / "raw"):
            if _holds_idx(place):
                return place
    where = ", ".join(dict.fromkeys(tried))
    raise MaskforgeError(
        f"Fashion-MNIST not found (looked in {where}): install Debian's package with "
        f"`apt-get install dataset-fashion-mnist`, or put its four IDX files ({', '.join(_IDX_FILES)}, "
        f".gz or not) in a folder and set {DATA_ENV}=that folder or pass --data that folder"
    )


def _candidates() -> list[Path]:
    folders = []
    root = os.environ.get(DATA_ENV)
    if root:
        base = Path(root).expanduser()
        folders += [base / "fashion-mnist", base / "FashionMNIST", base]
    folders += [Path(folder) for folder in SYSTEM_FOLDERS]
    return folders


def _holds_idx(folder: Path) -> bool:
    """All four files present (a half-copied folder is passed over, so a later place can still serve)."""
    return all((folder / name).is_file() or (folder / f"{name}.gz").is_file() for name in _IDX_FILES)

"""CIFAR-10 folders: python pickles (``cifar-10-batches-py``) and binary records (``cifar-10-batches-bin``).

The pickles are read with a restricted unpickler that admits only numpy's array reconstruction: a
pickle can otherwise run any code, and torchvision's CIFAR10 class unpickles without restriction.
Held-out = the test batch.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ..errors import MaskforgeError
from .datasets import DataSplits, check_labels, in_memory_splits

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
    return data.reshape(-1, 3, 32, 32), check_labels(labels, len(data), num_classes, path)


def load_cifar10_python(folder: Path) -> DataSplits:
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
    return in_memory_splits(str(folder), "cifar10", train, heldout, class_names, augment=True)


def _cifar_binary_batch(path: Path, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    if not path.is_file():
        raise MaskforgeError(f"CIFAR-10 file {path} is missing")
    raw = np.fromfile(path, dtype=np.uint8)
    if raw.size == 0 or raw.size % 3073:
        raise MaskforgeError(f"CIFAR-10 file {path} is not a sequence of 3073-byte records (size {raw.size})")
    records = raw.reshape(-1, 3073)
    labels = check_labels(records[:, 0], len(records), num_classes, path)
    return np.ascontiguousarray(records[:, 1:]).reshape(-1, 3, 32, 32), labels


def load_cifar10_binary(folder: Path) -> DataSplits:
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
    return in_memory_splits(str(folder), "cifar10", train, heldout, class_names, augment=True)


def find_cifar10(path: Path):
    """The loader and folder of the CIFAR-10 batches at `path` (or in its standard subfolder), or None."""
    for candidate in (path, path / "cifar-10-batches-py"):
        if (candidate / "batches.meta").exists() or (candidate / "data_batch_1").exists():
            return load_cifar10_python, candidate
    for candidate in (path, path / "cifar-10-batches-bin"):
        if (candidate / "batches.meta.txt").exists() or (candidate / "data_batch_1.bin").exists():
            return load_cifar10_binary, candidate
    return None

"""Where an export (or a report) is written: checked before any work; its missing folders are created
only when the file is written, and removed again when writing fails, so a failure leaves nothing behind.

Merge note: nothing here is export-specific (`eval --json` and `--confusion-png` use it too); it belongs
beside `fileio.atomic_path` once that module can take it.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator

from ..errors import MaskforgeError
from ..fileio import ensure_writable_dir


def check_output_path(path: str | os.PathLike, what: str = "output") -> Path:
    """Fail early, before any expensive work, if `path` cannot become a file (`what` names it in the
    message). Missing folders are fine, but only below a folder that exists and is writable."""
    path = Path(path)
    if path.is_dir():
        raise MaskforgeError(f"{what} {path} is a folder; give a file name")
    try:
        ensure_writable_dir(_nearest_existing(_parent(path)))  # it exists: nothing is created here
    except MaskforgeError as exc:
        raise MaskforgeError(f"cannot write {path}: {exc}") from None
    return path


@contextlib.contextmanager
def output_folder(path: str | os.PathLike) -> Iterator[Path]:
    """Create the missing folders above `path` for the block; if the block fails, remove the ones it
    created (deepest first, while they are empty) before the error goes on."""
    path = Path(path)
    folder = _parent(path)
    created, missing = [], folder
    while not missing.exists() and not missing.is_symlink():
        created.append(missing)
        missing = missing.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise MaskforgeError(f"cannot create folder {folder} for {path}: {exc.strerror or exc}") from None
    try:
        yield path
    except BaseException:
        for empty in created:
            try:
                empty.rmdir()
            except OSError:
                break
        raise


def _parent(path: Path) -> Path:
    return path.parent if str(path.parent) else Path(".")


def _nearest_existing(folder: Path) -> Path:
    while not folder.exists() and not folder.is_symlink() and folder != folder.parent:
        folder = folder.parent
    return folder

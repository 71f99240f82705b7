"""Atomic file writes: a reader (or a crash) sees the old file or the new one, never a torn one.

Every file maskforge writes goes through `atomic_write`: the bytes go to a temporary file in the same
folder (so the final rename never crosses file systems), are flushed and fsynced, and only then renamed
over the destination. If anything fails on the way the temporary file is removed and the destination is
left as it was.

A write that fails because the disk is full (ENOSPC), a quota is exceeded (EDQUOT) or the file would pass
a size limit (EFBIG, e.g. `ulimit -f`) gives one `MaskforgeError` that says so and that the previous file
is unchanged, also when the writer is a library that reports the OS error in its own exception type
(safetensors says "... (os error 27)").
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import tempfile
from pathlib import Path
from typing import Callable, Iterator

from .errors import MaskforgeError

try:
    import fcntl
except ImportError:  # Windows: stale temporaries are not cleaned up
    fcntl = None


def read_bytes(path: str | os.PathLike, what: str = "file") -> bytes:
    """The content of `path`, or a MaskforgeError that says why it cannot be read (`what` names it)."""
    path = Path(path)
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise MaskforgeError(f"{what} {path} {missing_reason(path)}") from None
    except IsADirectoryError:
        raise MaskforgeError(f"{path} is a folder, not an {what} file") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise MaskforgeError(f"{what} {path} {missing_reason(path)}") from None
        raise MaskforgeError(f"cannot read {path}: {exc.strerror or exc}") from None


def missing_reason(path: str | os.PathLike) -> str:
    """Why `path` cannot be opened although it may be listed: "does not exist", or, for a symbolic link
    whose target cannot be reached, "is a symbolic link that loops" / "is a broken symbolic link (to X)"."""
    path = Path(path)
    try:
        os.stat(path)
        return "exists"  # not missing after all (a race); callers only ask after a failure
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "is a symbolic link that loops (it leads back to itself)"
        if not os.path.islink(path):
            return "does not exist"
    try:
        return f"is a broken symbolic link (to {os.readlink(path)}, which does not exist)"
    except OSError:
        return "does not exist"


def ensure_writable_dir(folder: str | os.PathLike) -> Path:
    """Create `folder` if needed and check that we can write into it, or raise a clear error."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise MaskforgeError(f"output path {folder} exists and is not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise MaskforgeError(f"cannot create output folder {folder}: {exc.strerror or exc}") from None
    if not folder.is_dir():
        raise MaskforgeError(f"output path {folder} exists and is not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise MaskforgeError(f"output folder {folder} is not writable")
    return folder


@contextlib.contextmanager
def atomic_path(destination: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `destination`; on success it is fsynced and renamed over it.

    Use this for writers that insist on a path (safetensors, onnx). On any exception the temporary
    file is deleted and `destination` is untouched.

    >>> with atomic_path("out.txt") as tmp:          # doctest: +SKIP
    ...     tmp.write_text("hello")
    """
    destination = Path(destination)
    folder = destination.parent if str(destination.parent) else Path(".")
    if not folder.is_dir():
        raise MaskforgeError(f"output folder {folder} does not exist")
    _remove_stale_temporaries(destination, folder)
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=_temporary_prefix(destination), suffix=".tmp", dir=folder)
    except OSError as exc:
        raise MaskforgeError(write_error(destination, exc.errno, exc.strerror or str(exc))) from None
    _hold(fd)  # the lock says "a writer is alive": a later write removes only temporaries nobody holds
    tmp = Path(tmp_name)
    try:
        yield tmp
        # mkstemp creates 0600; give the file the permissions a plain open() would (0666 minus umask).
        os.chmod(tmp, 0o666 & ~_current_umask())
        _fsync_file(tmp)
        os.replace(tmp, destination)
        _fsync_dir(folder)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise MaskforgeError(write_error(destination, exc.errno, exc.strerror or str(exc))) from None
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        code = reported_errno(exc)
        if code in NO_ROOM:
            raise MaskforgeError(write_error(destination, code, os.strerror(code))) from None
        raise
    finally:
        os.close(fd)


def _temporary_prefix(destination: Path) -> str:
    return f".{destination.name}."


def _hold(fd: int) -> None:
    """Lock the temporary file for the writer's lifetime (released when its descriptor closes, or by the
    kernel when the process dies: SIGKILL included)."""
    if fcntl is not None:
        with contextlib.suppress(OSError):  # a file system without locks: no cleanup, nothing worse
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)


def _remove_stale_temporaries(destination: Path, folder: Path) -> None:
    """Remove the temporaries of earlier writes of `destination` whose writer is gone (killed: SIGKILL,
    power loss), i.e. `.NAME.<8 characters>.tmp` files that no live writer holds locked. Those of other
    files, and of a writer still at work, are left alone."""
    if fcntl is None:
        return
    pattern = re.compile(re.escape(_temporary_prefix(destination)) + r"[a-z0-9_]{8}\.tmp")
    try:
        names = [entry.name for entry in os.scandir(folder) if pattern.fullmatch(entry.name)]
    except OSError:
        return
    for name in names:
        path = folder / name
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            continue  # held: a writer is still at work
        else:
            with contextlib.suppress(OSError):
                path.unlink()
        finally:
            os.close(fd)


#: errno values that mean "no room for this file": the disk, a quota or a file-size limit
NO_ROOM = {errno.ENOSPC, errno.EFBIG, getattr(errno, "EDQUOT", errno.ENOSPC)}
NO_ROOM_WHY = {
    errno.ENOSPC: "the disk is full",
    errno.EFBIG: "the file would exceed the file-size limit (ulimit -f) or the file system's largest file",
    getattr(errno, "EDQUOT", errno.ENOSPC): "the disk quota is exhausted",
}


def write_error(destination: str | os.PathLike, code: int | None, reason: str) -> str:
    """The message of a failed write of `destination`: the OS reason, and for a full disk what that means."""
    message = f"cannot write {destination}: {reason}"
    if code in NO_ROOM:
        message += f" ({NO_ROOM_WHY[code]}; the previous {Path(destination).name}, if any, is unchanged)"
    return message


def reported_errno(exc: BaseException) -> int | None:
    """The errno of an OS error that a writer library wrapped in its own exception (or its cause)."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, OSError) and exc.errno is not None:
            return exc.errno
        found = re.search(r"os error (\d+)", str(exc))  # Rust's io::Error, e.g. safetensors
        if found:
            return int(found.group(1))
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return None


def atomic_write(destination: str | os.PathLike, data: bytes | str | Callable[[Path], None]) -> Path:
    """Write `data` (bytes, text, or a callable that writes to a given path) to `destination` atomically."""
    with atomic_path(destination) as tmp:
        if callable(data):
            data(tmp)
        elif isinstance(data, str):
            tmp.write_text(data, encoding="utf-8")
        else:
            tmp.write_bytes(data)
    return Path(destination)


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as handle:
        handle.flush()
        os.fsync(handle.fileno())


def _fsync_dir(folder: Path) -> None:
    # The rename is durable only once the folder entry is on disk; some file systems refuse this.
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

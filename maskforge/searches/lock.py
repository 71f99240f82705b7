"""The run folder's lock: one search at a time writes into a folder, for the whole life of the search.

`RunLock.acquire(folder)` takes an exclusive POSIX record lock (`fcntl.lockf`) on `folder/search.lock`
and writes the holder's pid, host, start time and command line into the file. A second search, in
another process or in this one, is refused with a `MaskforgeError` that names the holder.

Why a POSIX lock on a file rather than "create the file if absent": the kernel drops the lock when the
holding process ends, however it ends (SIGKILL included), so a lock left by a dead search never blocks
anyone: the next search takes it over and rewrites the holder record (it says so). A POSIX lock belongs
to a process and is not inherited by `fork`, so data-loader workers that outlive a killed search for a
moment do not hold it either: torchrun's elastic restart finds the folder free. POSIX locks work on NFS.

Under torchrun only rank 0 holds the lock (maskforge.searches.plan takes it for the whole world).
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import json
import logging
import os
import socket
import sys
from pathlib import Path

from ..errors import MaskforgeError
from ..fileio import ensure_writable_dir
from ..runfiles import LOCK_NAME  # re-exported: the name belongs to the run folder

try:
    import fcntl
except ImportError:  # not POSIX (Windows): searches run unlocked, with a warning
    fcntl = None


log = logging.getLogger(__name__)

#: Lock files held by this process (a POSIX lock does not stop a second search in the same process).
_HELD: dict[Path, "RunLock"] = {}


class RunLocked(MaskforgeError):
    """The run folder is locked by another search."""


class RunLock:
    """An acquired lock; `release()` removes the lock file and any folder `acquire` created (if empty)."""

    def __init__(self, path: Path, fd: int | None, created: list[Path]) -> None:
        self.path = path
        self._fd = fd
        self._created = created

    @classmethod
    def acquire(cls, folder: str | os.PathLike, *, create: bool = True) -> "RunLock":
        """Lock `folder` (created with its parents if `create`), or raise `RunLocked` naming the holder."""
        folder = Path(folder)
        created = _make_folders(folder) if create else []
        try:
            return cls._take(folder / LOCK_NAME, created)
        except BaseException:
            _remove_empty(created)
            raise

    @classmethod
    def _take(cls, path: Path, created: list[Path]) -> "RunLock":
        key = path.resolve()
        if key in _HELD:
            raise RunLocked(_locked_message(path, _describe(_holder_record()), "this process"))
        for _ in range(5):  # retry if the file was replaced between open and lock (see below)
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
            except OSError as exc:
                raise MaskforgeError(f"cannot create the lock file {path}: {exc.strerror or exc}") from None
            try:
                lock = cls._lock_open_file(path, fd, key, created)
            except BaseException:  # refused, an OS error, or a signal: the descriptor (and lock) go with it
                with contextlib.suppress(OSError):
                    os.close(fd)
                raise
            if lock is not None:
                return lock
        raise MaskforgeError(f"cannot lock {path}: it keeps being replaced by other processes")

    @classmethod
    def _lock_open_file(cls, path: Path, fd: int, key: Path, created: list[Path]) -> "RunLock | None":
        """Lock the open lock file `fd`; None when it is no longer the file at `path` (the caller retries)."""
        try:
            if fcntl is None:
                raise OSError(errno.ENOSYS, "no POSIX locks on this system")
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                log.warning(
                    "cannot lock %s (%s): this file system does not support locks; make sure no "
                    "other search writes into %s",
                    path,
                    exc.strerror,
                    path.parent,
                )
                _write_record(fd, _holder_record())
                lock = _HELD[key] = cls(path, fd, created)
                return lock
            record = _read_record(fd)
            if exc.errno in (errno.EACCES, errno.EAGAIN):
                raise RunLocked(_locked_message(path, _describe(record), "another search")) from None
            raise MaskforgeError(f"cannot lock {path}: {exc.strerror or exc}") from None
        # A holder that released its lock unlinked the file first: if our file is no longer the one at
        # `path`, a third process may lock the new file; start over on the new one.
        if not _same_file(fd, path):
            os.close(fd)
            return None
        previous = _read_record(fd)
        if previous:
            log.info("took over %s, left by a search that is no longer running (%s)", path, _describe(previous))
        _write_record(fd, _holder_record())
        lock = _HELD[key] = cls(path, fd, created)
        return lock

    def release(self) -> None:
        """Remove the lock file and unlock (in that order: see `_take`); idempotent."""
        _HELD.pop(self.path.resolve(), None)
        if self._fd is not None:
            try:
                self.path.unlink(missing_ok=True)
            finally:
                os.close(self._fd)  # closing drops the lock
                self._fd = None
        _remove_empty(self._created)
        self._created = []


def _make_folders(folder: Path) -> list[Path]:
    """Create `folder` and missing parents (`ensure_writable_dir`'s checks); return the ones created
    (deepest last), so that a refused lock can remove them again."""
    missing = []
    for candidate in (folder, *folder.parents):
        if candidate.exists():
            break
        missing.append(candidate)
    try:
        ensure_writable_dir(folder)
    except MaskforgeError:
        _remove_empty(list(reversed(missing)))
        raise
    return list(reversed(missing))


def _remove_empty(created: list[Path]) -> None:
    for folder in reversed(created):
        try:
            folder.rmdir()
        except OSError:
            return  # not empty: the run wrote something, or another process did


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False


def _holder_record() -> dict:
    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    return {"pid": os.getpid(), "host": socket.gethostname(), "started": started, "command": " ".join(sys.argv)[:300]}


def _write_record(fd: int, record: dict) -> None:
    """Best effort: the holder record only names the holder in messages; a full disk must not fail the lock."""
    data = (json.dumps(record, sort_keys=True) + "\n").encode("utf-8")
    with contextlib.suppress(OSError):
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)


def _read_record(fd: int) -> dict:
    try:
        record = json.loads(os.pread(fd, 4096, 0).decode("utf-8") or "{}")
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def _describe(record: dict) -> str:
    if not record.get("pid"):
        return "holder not recorded yet"
    text = f"pid {record['pid']} on host {record.get('host', '?')}, started {record.get('started', '?')}"
    return text + (f": {record['command']}" if record.get("command") else "")


def _locked_message(path: Path, holder: str, who: str) -> str:
    return (
        f"run folder {path.parent} is in use by {who} ({holder}; lock file {path}): wait for it to "
        f"finish, or choose another out folder"
    )

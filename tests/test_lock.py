"""The run folder's lock (issue 10, item 2): two searches into one folder at once do not interleave: the
second refuses with one line naming the first one's process (pid, host, start time); a lock left by a
dead search is taken over; default folders pass over a folder in use.

The first holder is a forked child process that takes the lock exactly as a search does, so the lock is
seen across processes as it would be from two terminals or two array jobs.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import re
import socket
import sys
from pathlib import Path

import pytest

from maskforge.errors import MaskforgeError
from maskforge.searches import SearchConfig, search
from maskforge.searches.lock import LOCK_NAME, RunLock

FORK = multiprocessing.get_context("fork")
COMMON = dict(arch="fc", epochs=1, max_steps=3, batch_size=500, device="cpu", workers=0)


def _hold_lock(folder: str, started, release) -> None:
    """In the child: take the folder's lock as a search does, and keep it until `release` is set. (A forked
    child must not run torch: the parent's OpenMP pool does not survive a fork.)"""
    lock = RunLock.acquire(folder)
    started.set()
    release.wait(60)
    lock.release()


def test_a_second_search_into_a_busy_folder_is_refused_naming_the_first(tmp_path):
    out = tmp_path / "run"
    started, release = FORK.Event(), FORK.Event()
    first = FORK.Process(target=_hold_lock, args=(str(out), started, release), daemon=True)
    first.start()
    try:
        assert started.wait(60), "the first process did not take the lock"
        (out / "notes.txt").write_text("the first search's folder")
        with pytest.raises(MaskforgeError) as caught:
            search(SearchConfig(**COMMON, out=str(out)))
        message = str(caught.value)
        assert message.startswith(
            f"run folder {out} is in use by another search (pid {first.pid} on host {socket.gethostname()}, started "
        ), message
        assert re.search(r"started \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC", message), message
        assert message.endswith(f"lock file {out / LOCK_NAME}): wait for it to finish, or choose another out folder")
        assert sorted(p.name for p in out.iterdir()) == ["notes.txt", LOCK_NAME]  # the refused search wrote nothing
    finally:
        release.set()
        first.join(60)
        if first.is_alive():
            first.kill()
    assert first.exitcode == 0
    # the holder is gone: the next search runs, and its lock goes with it
    search(SearchConfig(**COMMON, out=str(out)))
    assert sorted(p.name for p in out.iterdir()) == [
        "artifact.safetensors",
        "config.json",
        "metrics.csv",
        "metrics.jsonl",
        "notes.txt",
    ]


def _lock_and_die(folder: str) -> None:
    RunLock.acquire(folder)
    os._exit(0)  # no release: the lock file and its holder record stay behind


def test_a_lock_left_by_a_dead_search_is_taken_over(tmp_path, caplog):
    out = tmp_path / "run"
    dead = FORK.Process(target=_lock_and_die, args=(str(out),), daemon=True)
    dead.start()
    dead.join(60)
    assert (out / LOCK_NAME).exists() and f'"pid": {dead.pid}' in (out / LOCK_NAME).read_text()
    with caplog.at_level(logging.INFO, logger="maskforge"):
        result = search(SearchConfig(**COMMON, out=str(out)))
    assert result.artifact_path.exists() and not (out / LOCK_NAME).exists()
    assert any(
        record.getMessage().startswith(
            f"took over {out / LOCK_NAME}, left by a search that is no longer running (pid {dead.pid} on host "
        )
        for record in caplog.records
    )


def test_a_search_in_the_same_process_is_refused_too(tmp_path):
    lock = RunLock.acquire(tmp_path / "run")
    try:
        with pytest.raises(
            MaskforgeError,
            match=f"^run folder {tmp_path / 'run'} is in use by this process \\(pid {os.getpid()} on host ",
        ):
            search(SearchConfig(**COMMON, out=str(tmp_path / "run")))
    finally:
        lock.release()
    assert not (tmp_path / "run").exists()  # release removes what acquire created


def test_a_default_folder_in_use_is_passed_over(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    lock = RunLock.acquire("runs/fc-k0.5-s0")
    try:
        result = search(SearchConfig(**COMMON))
    finally:
        lock.release()
    assert result.run_dir == Path("runs/fc-k0.5-s0-2")


def test_an_interrupt_while_taking_the_lock_leaves_no_open_lock_behind(tmp_path, monkeypatch):
    """Ctrl-C (or an OS error) between locking the file and writing the holder record: the descriptor is
    closed, so the lock goes with it, and the next attempt in this process takes it."""
    lock_module = sys.modules[RunLock.__module__]

    def interrupted(fd, path):
        raise KeyboardInterrupt

    folder = tmp_path / "run"
    open_fds = len(os.listdir("/proc/self/fd"))
    monkeypatch.setattr(lock_module, "_same_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        RunLock.acquire(folder)
    assert len(os.listdir("/proc/self/fd")) == open_fds  # the lock file's descriptor was closed
    monkeypatch.undo()
    lock = RunLock.acquire(folder)
    lock.release()

"""Atomic writes: a writer killed at any moment leaves the old file or the new one, never a torn one.

* Kill test: a child process rewrites a file with `atomic_write` and stops at a chosen moment (halfway
  through writing the temporary file, just before the rename, just after it), says so and waits; the
  parent SIGKILLs it there and checks that the destination is byte-exactly the old content (before the
  rename) or the new one (after). A control writer that writes in place (no temporary file), killed
  halfway the same way, leaves a torn file: the check can see tearing. The moments are hooks, not timing.
* What a killed writer can leave behind: its temporary file `.<name>.<random>.tmp` in the same folder
  (nothing can delete it after SIGKILL). It is never read by maskforge; delete stale ones at will
  (docs/TROUBLESHOOTING.md).
* Simulated full disk (ENOSPC at write, fsync or rename): a clear `MaskforgeError`, the old file intact,
  no temporary file left.
* A real "no room" error from the kernel: a child process under `RLIMIT_FSIZE` (writes past the limit
  fail with EFBIG) rewrites an artifact, a checkpoint, metrics and a report, and extends a search through
  the CLI: each fails with one clear error that names the file, and every previous file is intact.
* Every writer in the library goes through `maskforge.fileio` (an AST scan of the source).
"""

from __future__ import annotations

import ast
import errno
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import maskforge
from maskforge import fileio
from maskforge.errors import MaskforgeError
from maskforge.fileio import atomic_path, atomic_write

PACKAGE_DIR = Path(maskforge.__file__).parent
CLI_DIR = PACKAGE_DIR.parent / "cli"

# The child imports maskforge.fileio without maskforge/__init__ (which would import torch: seconds per
# process); fileio depends on nothing but the standard library and maskforge.errors. It writes the new
# content and stops at `moment`: it prints "stopped" and sleeps until the parent kills it.
_CHILD = r"""
import os, sys, time, types
package = types.ModuleType("maskforge")
package.__path__ = [sys.argv[1]]
sys.modules["maskforge"] = package
from maskforge.fileio import atomic_write

mode, moment, dest, size = sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
data = bytes(range(256)) * (size // 256)


def stop():
    sys.stdout.write("stopped\n")
    sys.stdout.flush()
    time.sleep(3600)


def write_half_then_stop(path):
    with open(path, "wb") as handle:
        handle.write(data[: size // 2])
        handle.flush()
        os.fsync(handle.fileno())
        stop()


if mode == "inplace":            # the control: no temporary file
    write_half_then_stop(dest)
elif moment == "writing":        # halfway through the temporary file
    atomic_write(dest, write_half_then_stop)
else:
    if moment == "renaming":     # the temporary file complete and fsynced, not yet renamed
        os.replace = lambda *args: stop()
    atomic_write(dest, data)
    stop()                       # "renamed": atomic_write has returned
"""
SIZE = 1024 * 1024
OLD = b"old content\n" * 1000
NEW = bytes(range(256)) * (SIZE // 256)


def _killed_at(folder: Path, mode: str, moment: str) -> tuple[bytes, list[Path]]:
    """The destination's bytes and the temporary files left after a writer is killed at `moment`."""
    dest = folder / f"{mode}-{moment}.bin"
    dest.write_bytes(OLD)  # the parent's own setup write, not under test
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(PACKAGE_DIR), mode, moment, str(dest), str(SIZE)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert child.stdout.readline().strip() == b"stopped", child.stderr.read().decode()
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=60)
        child.stdout.close()
        child.stderr.close()
    assert child.returncode == -signal.SIGKILL, child.returncode
    return dest.read_bytes(), sorted(folder.glob(f".{dest.name}.*.tmp"))


@pytest.mark.parametrize(
    "moment, expected, temporaries",
    [
        ("writing", OLD, 1),  # killed while writing the temporary file: the old file, intact
        ("renaming", OLD, 1),  # killed with the new content complete but not renamed: still the old file
        ("renamed", NEW, 0),  # killed after the rename: the new file, whole
    ],
)
def test_killed_writer_leaves_old_or_new_never_torn(tmp_path, moment, expected, temporaries):
    final, litter = _killed_at(tmp_path, "atomic", moment)
    assert final == expected
    # what a killed writer leaves: its temporary file (never read by maskforge; delete it at will)
    assert len(litter) == temporaries


def test_the_kill_test_can_see_a_torn_file(tmp_path):
    """The control: an in-place writer killed halfway leaves neither the old content nor the new."""
    final, _ = _killed_at(tmp_path, "inplace", "writing")
    assert final not in (OLD, NEW) and final == NEW[: SIZE // 2]


def test_atomic_write_replaces_and_leaves_no_temp(tmp_path):
    dest = tmp_path / "report.json"
    atomic_write(dest, "one")
    atomic_write(dest, b"two")
    atomic_write(dest, lambda tmp: tmp.write_text("three"))
    assert dest.read_text() == "three"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]


# --- simulated full disk -----------------------------------------------------------------------------------


def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("where", ["write", "fsync", "rename"])
def test_full_disk_keeps_the_old_file(tmp_path, monkeypatch, where):
    dest = tmp_path / "artifact.safetensors"
    dest.write_bytes(b"the old, complete file")
    if where == "write":
        original = Path.write_bytes

        def half_then_full(self, data):
            original(self, data[: len(data) // 2])  # part of the data reaches the disk, then it is full
            _enospc()

        monkeypatch.setattr(Path, "write_bytes", half_then_full)
    elif where == "fsync":
        monkeypatch.setattr(fileio.os, "fsync", _enospc)
    else:
        monkeypatch.setattr(fileio.os, "replace", _enospc)
    with pytest.raises(MaskforgeError, match=rf"cannot write {dest}: No space left on device"):
        atomic_write(dest, b"x" * 100_000)
    monkeypatch.undo()
    assert dest.read_bytes() == b"the old, complete file"
    assert [p.name for p in tmp_path.iterdir()] == ["artifact.safetensors"]


def test_full_disk_while_saving_an_artifact(tmp_path, monkeypatch):
    from maskforge.archs import arch_args, create_model
    from maskforge.artifact import build_artifact, load_artifact, save_artifact
    from maskforge.data import InputSpec

    args = arch_args(1, 3, (4, 4))
    spec = InputSpec(1, 4, 4, (0.5,), (0.25,), ("a", "b", "c"))
    artifact = build_artifact(
        create_model("fc", **args, k=0.5, seed=1),
        arch="fc",
        arch_args=args,
        spec=spec,
        seed=1,
        init="signed_constant",
        scale_fan=False,
        k=0.5,
    )
    path = save_artifact(artifact, tmp_path / "artifact.safetensors")
    before = path.read_bytes()
    monkeypatch.setattr(fileio.os, "fsync", _enospc)
    with pytest.raises(MaskforgeError, match="No space left on device"):
        save_artifact(artifact, path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    load_artifact(path)  # still a valid artifact
    assert [p.name for p in tmp_path.iterdir()] == ["artifact.safetensors"]


def test_missing_output_folder_is_a_clear_error(tmp_path):
    with pytest.raises(MaskforgeError, match="does not exist"):
        atomic_write(tmp_path / "no" / "such" / "file.json", "{}")


def test_exception_inside_atomic_path_removes_the_temp(tmp_path):
    dest = tmp_path / "model.onnx"
    dest.write_bytes(b"old")
    with pytest.raises(ValueError):
        with atomic_path(dest) as tmp:
            tmp.write_bytes(b"half")
            raise ValueError("the exporter failed")
    assert dest.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]


# --- every writer goes through fileio ----------------------------------------------------------------------

# json.dump and friends write to an open handle: the `open(..., "w")` is what gets flagged.
_WRITE_CALLS = {
    "write_bytes",
    "write_text",
    "save_file",
    "save",
    "savez",
    "savez_compressed",
    "to_csv",
    "SerializeToFile",
    "save_model",
}


def _writes_outside_atomic(tree: ast.AST) -> list[str]:
    """Calls that write files and are neither inside `with atomic_path(...)` nor arguments of atomic_write."""
    problems: list[str] = []

    def is_call_to(node: ast.AST, name: str) -> bool:
        return isinstance(node, ast.Call) and (
            (isinstance(node.func, ast.Name) and node.func.id == name)
            or (isinstance(node.func, ast.Attribute) and node.func.attr == name)
        )

    def visit(node: ast.AST, protected: bool) -> None:
        if isinstance(node, ast.With) and any(is_call_to(item.context_expr, "atomic_path") for item in node.items):
            protected = True
        if is_call_to(node, "atomic_write"):
            protected = True
        if isinstance(node, ast.Call) and not protected:
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            # a bare `save(...)` is usually a local helper; library writers are methods or save_file/save_model
            if name in _WRITE_CALLS and (isinstance(func, ast.Attribute) or name in ("save_file", "save_model")):
                problems.append(f"line {node.lineno}: {ast.unparse(node)[:80]}")
            if name == "open" and _open_mode(node) and any(c in _open_mode(node) for c in "wax+"):
                problems.append(f"line {node.lineno}: {ast.unparse(node)[:80]}")
        for child in ast.iter_child_nodes(node):
            visit(child, protected)

    visit(tree, False)
    return problems


def _open_mode(node: ast.Call) -> str:
    mode = node.args[1] if len(node.args) > 1 else next((kw.value for kw in node.keywords if kw.arg == "mode"), None)
    return mode.value if isinstance(mode, ast.Constant) and isinstance(mode.value, str) else ""


def test_every_library_writer_is_atomic():
    offenders = {}
    for source in sorted([*PACKAGE_DIR.rglob("*.py"), *CLI_DIR.rglob("*.py")]):
        if source.name == "fileio.py":
            continue
        problems = _writes_outside_atomic(ast.parse(source.read_text(), str(source)))
        if problems:
            offenders[str(source.relative_to(PACKAGE_DIR.parent))] = problems
    assert not offenders, f"file writes that bypass maskforge.fileio (use atomic_write/atomic_path): {offenders}"


# --- a real EFBIG: RLIMIT_FSIZE in a child process ---------------------------------------------------------

_LIMITED = r"""
import json, resource, sys
from pathlib import Path

run, limit = Path(sys.argv[1]), int(sys.argv[2])
from maskforge.artifact import load_artifact, save_artifact
from maskforge.checkpoint import load_checkpoint, save_checkpoint
from maskforge.errors import MaskforgeError
from maskforge.fileio import atomic_write
from maskforge.metricfiles import write_metrics

artifact = load_artifact(run / "artifact.safetensors")
checkpoint = load_checkpoint(run / "checkpoint.safetensors")
records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))  # from here on, no file may grow past `limit`
results = {}
for name, write in [("artifact", lambda: save_artifact(artifact, run / "artifact.safetensors")),
                    ("checkpoint", lambda: save_checkpoint(checkpoint, run / "checkpoint.safetensors")),
                    ("metrics", lambda: write_metrics(run, records * 100)),
                    ("report", lambda: atomic_write(run / "report.json", "x" * (limit + 1)))]:
    try:
        write()
        results[name] = "written"
    except MaskforgeError as exc:
        results[name] = str(exc)
print(json.dumps(results), flush=True)
from maskforge.cli import main
sys.argv = ["maskforge", "search", "--resume", str(run), "--epochs", "3", "-q"]
main()
"""


def test_no_room_for_a_file_is_one_clear_error_and_the_previous_file_stays(tmp_path):
    from maskforge.searches import SearchConfig, search

    run = tmp_path / "run"
    search(SearchConfig(arch="fc", epochs=2, batch_size=500, device="cpu", keep_checkpoint=True, out=str(run)))
    (run / "report.json").write_text("the previous report")
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    limit = 20_000  # above config.json, below the artifact (35 kB), the checkpoint (2 MB), 200 metrics records
    assert len(before["artifact.safetensors"]) > limit and len(before["config.json"]) < limit
    child = subprocess.run(
        [sys.executable, "-c", _LIMITED, str(run), str(limit)],
        capture_output=True,
        text=True,
        timeout=240,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    why = (
        f"{os.strerror(errno.EFBIG)} (the file would exceed the file-size limit (ulimit -f) or the file system's "
        f"largest file; the previous {{name}}, if any, is unchanged)"
    )
    results = json.loads(child.stdout.splitlines()[0])
    for kind, name in [
        ("artifact", "artifact.safetensors"),
        ("checkpoint", "checkpoint.safetensors"),
        ("metrics", "metrics.jsonl"),
        ("report", "report.json"),
    ]:
        assert results[kind] == f"cannot write {run / name}: " + why.format(name=name), results[kind]
    # The CLI: the extension ran its epoch, then could not write the checkpoint: one line, exit 2.
    assert child.returncode == 2, child.stderr
    assert child.stderr.splitlines() == [
        f"error: cannot write {run / 'checkpoint.safetensors'}: " + why.format(name="checkpoint.safetensors")
    ], child.stderr
    assert (run / "checkpoint.safetensors").read_bytes() == before["checkpoint.safetensors"]
    # metrics.jsonl was rewritten whole by the extension's third epoch, before its checkpoint failed
    assert (run / "metrics.jsonl").read_bytes().startswith(before["metrics.jsonl"])
    # the extension had moved the finished search's artifact and the report aside, untouched
    for name in ("artifact.safetensors", "report.json"):
        assert (run / "previous-1" / name).read_bytes() == before[name], name
    assert not [p.name for p in run.rglob(".*.tmp")]

"""The error contract, command by command: every user error prints exactly one `error: ...` line on stderr
and exits 2; an unexpected failure exits 1 with a hint; `--debug` shows the traceback.

The table walks each command (archs, search, inspect, verify, and export/eval when their modules exist)
through its bad inputs: missing, unreadable and wrong-type files, empty data sets, mismatched classes,
channels and sizes, out-of-range options, unwritable or missing output folders and a full disk
(simulated with ENOSPC). Each row also pins the gist of the message, so a regression to a vaguer
message fails. The table is printed at the end of the module (it is the source of
docs/TROUBLESHOOTING.md). A few rows run the real `maskforge` executable to check the real stderr and
exit code.
"""

from __future__ import annotations

import errno
import hashlib
import importlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from maskforge import fileio
from maskforge.archs import arch_args, create_model
from maskforge.artifact import build_artifact, save_artifact
from maskforge.cli import app
from maskforge.cli.commands import COMMANDS as CLI_COMMANDS
from maskforge.data import InputSpec

# Every command of this checkout (each module loads when its command runs).
COMMANDS = {name for name, command in CLI_COMMANDS.items() if importlib.util.find_spec(command.module)}
EXECUTABLE = Path(sys.executable).parent / "maskforge"
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
_TABLE: list[tuple[str, str, int, str]] = []


# ---------------------------------------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------------------------------------


def _artifact(path: Path, channels: int = 1, classes: int = 3, size: int = 8, seed: int = 3) -> Path:
    args = arch_args(channels, classes, (size, size))
    spec = InputSpec(channels, size, size, (0.5,) * channels, (0.25,) * channels, tuple(str(i) for i in range(classes)))
    model = create_model("fc", **args, k=0.5, seed=seed)
    artifact = build_artifact(
        model,
        arch="fc",
        arch_args=args,
        spec=spec,
        seed=seed,
        init="signed_constant",
        scale_fan=False,
        k=0.5,
        provenance={"data": "mnist5k"},
    )
    return save_artifact(artifact, path)


def _rewrite_document(source: Path, dest: Path, edit: Callable[[dict], None], *, redigest: bool = True) -> Path:
    data = source.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    document = json.loads(header["__metadata__"]["maskforge"])
    edit(document)
    if redigest:
        body = {k: v for k, v in document.items() if k != "digests"}
        document["digests"]["document"] = hashlib.sha256(
            json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
        ).hexdigest()
    header["__metadata__"]["maskforge"] = json.dumps(document, sort_keys=True, separators=(",", ":"))
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    dest.write_bytes(len(raw).to_bytes(8, "little") + raw + data[8 + n :])
    return dest


def _image_folder(root: Path, train: dict[str, int], val: dict[str, int], corrupt: str | None = None) -> Path:
    for split, classes in (("train", train), ("val", val)):
        for name, count in classes.items():
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                Image.fromarray(np.full((8, 8), 40 * i, dtype=np.uint8)).save(folder / f"{i}.png")
    if corrupt:
        (root / corrupt).write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
    return root


@dataclass
class Files:
    root: Path
    paths: dict[str, Path] = field(default_factory=dict)

    def __getattr__(self, name: str) -> str:
        return str(self.paths[name])


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Files:
    root = tmp_path_factory.mktemp("errors")
    f = Files(root)
    p = f.paths
    p["good"] = _artifact(root / "good.safetensors")
    p["good3ch"] = _artifact(root / "rgb.safetensors", channels=3, size=28, classes=10)
    p["good28"] = _artifact(root / "gray28.safetensors", channels=1, size=28, classes=3)
    p["missing"] = root / "missing.safetensors"
    p["folder"] = root / "a_folder"
    p["folder"].mkdir()
    p["text"] = root / "notes.txt"
    p["text"].write_text("hello, I am not an artifact\n")
    p["png"] = root / "picture.png"
    Image.fromarray(np.zeros((4, 4), dtype=np.uint8)).save(p["png"])
    p["empty"] = root / "empty.safetensors"
    p["empty"].write_bytes(b"")
    data = p["good"].read_bytes()
    p["truncated"] = root / "truncated.safetensors"
    p["truncated"].write_bytes(data[: len(data) // 2])
    corrupted = bytearray(data)
    corrupted[-3] ^= 0x10
    p["corrupted"] = root / "corrupted.safetensors"
    p["corrupted"].write_bytes(bytes(corrupted))
    p["newer"] = _rewrite_document(p["good"], root / "newer.safetensors", lambda d: d.__setitem__("format_version", 99))
    first_layer = "1.weight"
    p["weights_tampered"] = _rewrite_document(
        p["good"], root / "weights.safetensors", lambda d: d["digests"]["weights"].__setitem__(first_layer, "0" * 64)
    )
    p["bad_k"] = _rewrite_document(p["good"], root / "k.safetensors", lambda d: d.__setitem__("k", 0.0))
    p["fake_onnx"] = root / "fake.onnx"
    p["fake_onnx"].write_bytes(b"\x08\x07garbage that protobuf cannot parse \xff\xff\xff")
    p["empty_data"] = root / "empty_data"
    (p["empty_data"] / "train" / "cat").mkdir(parents=True)
    (p["empty_data"] / "val" / "cat").mkdir(parents=True)
    p["mismatched_classes"] = _image_folder(root / "mismatch", {"cat": 2, "dog": 2}, {"cat": 1, "bird": 1})
    p["corrupt_image"] = _image_folder(
        root / "corrupt", {"cat": 1, "dog": 1}, {"cat": 1, "dog": 1}, corrupt="train/dog/broken.png"
    )
    p["no_val"] = root / "no_val"
    (p["no_val"] / "train" / "cat").mkdir(parents=True)
    p["file_as_dir"] = root / "plainfile"
    p["file_as_dir"].write_text("x")
    p["out_under_file"] = p["file_as_dir"] / "run"
    p["readonly_dir"] = root / "readonly"
    p["readonly_dir"].mkdir()
    p["new_out"] = root / "new_out"
    p["onnx_out"] = root / "out.onnx"
    p["unreadable"] = root / "unreadable.safetensors"
    p["unreadable"].write_bytes(data)
    return f


@pytest.fixture(autouse=True)
def _no_debug(monkeypatch):
    monkeypatch.delenv("MASKFORGE_DEBUG", raising=False)  # a developer's setting must not change the table


@pytest.fixture(scope="module", autouse=True)
def _print_table(request):
    yield
    if not _TABLE:
        return
    lines = ["", "[errors] the error table (command | bad input | exit | stderr):"]
    lines += [f"[errors] {cmd:8s} | {case:36s} | {code} | {message}" for cmd, case, code, message in _TABLE]
    capture = request.config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled():  # shown in CI logs without -s, like capsys.disabled()
        print("\n".join(lines))


# ---------------------------------------------------------------------------------------------------------
# simulations (monkeypatch setups)
# ---------------------------------------------------------------------------------------------------------


def _full_disk(monkeypatch, files: Files) -> None:
    def enospc(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(fileio.os, "fsync", enospc)


def _unwritable(target_key: str):
    def setup(monkeypatch, files: Files) -> None:
        target = Path(files.paths[target_key]).resolve()
        real = os.access

        def access(path, mode, *args, **kwargs):
            if Path(path).resolve() == target and mode & os.W_OK:
                return False
            return real(path, mode, *args, **kwargs)

        monkeypatch.setattr(os, "access", access)

    return setup


def _unreadable(target_key: str):
    def setup(monkeypatch, files: Files) -> None:
        target = Path(files.paths[target_key]).resolve()
        real_read, real_open = Path.read_bytes, open

        def read_bytes(self):
            if self.resolve() == target:
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
            return real_read(self)

        def guarded_open(file, *args, **kwargs):
            if isinstance(file, (str, os.PathLike)) and Path(file).resolve() == target:
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(file))
            return real_open(file, *args, **kwargs)

        monkeypatch.setattr(Path, "read_bytes", read_bytes)
        monkeypatch.setattr("builtins.open", guarded_open)

    return setup


# ---------------------------------------------------------------------------------------------------------
# the table
# ---------------------------------------------------------------------------------------------------------


@dataclass
class Row:
    command: str
    case: str
    argv: Callable[[Files], list[str]]
    message: str  # regex the error line must match
    setup: Callable | None = None
    marks: tuple = ()


R = Row
ROWS = [
    # archs
    R("archs", "unknown option", lambda f: ["archs", "--bogus"], "No such option: --bogus"),
    # search: options out of range (checked before any data is loaded)
    R(
        "search",
        "k = 0",
        lambda f: ["search", "--k", "0"],
        r"^error: Invalid value for '--k': k is the fraction of weights kept, in \(0, 1\]",
    ),
    R(
        "search",
        "k > 1",
        lambda f: ["search", "--k", "1.5"],
        r"^error: Invalid value for '--k': k is the fraction of weights kept, in \(0, 1\]",
    ),
    R("search", "k not a number", lambda f: ["search", "--k", "half"], "Invalid value for '--k'"),
    R("search", "unknown architecture", lambda f: ["search", "--arch", "resnet9000"], "unknown architecture"),
    R("search", "epochs 0", lambda f: ["search", "--epochs", "0"], r"error: --epochs must be >= 1, got 0$"),
    R("search", "batch size 0", lambda f: ["search", "--batch-size", "0"], r"error: --batch-size must be >= 1, got 0$"),
    R("search", "negative lr", lambda f: ["search", "--lr", "-0.1"], r"error: --lr must be > 0, got -0\.1$"),
    R("search", "negative seed", lambda f: ["search", "--seed", "-1"], r"error: --seed must be >= 0, got -1$"),
    R(
        "search",
        "unknown init",
        lambda f: ["search", "--init", "xavier"],
        r"error: --init must be one of 'signed_constant', 'unsigned_constant' or 'kaiming_normal', "
        r"got 'xavier'$",
    ),
    R(
        "search",
        "unknown device",
        lambda f: ["search", "--device", "tpu"],
        r"error: --device must be one of 'auto', 'cpu' or 'cuda', got 'tpu'$",
    ),
    # search: data
    R("search", "missing data folder", lambda f: ["search", "--data", f.missing], "does not exist"),
    R("search", "data is a file", lambda f: ["search", "--data", f.text], "is not a folder"),
    R("search", "unrecognized data folder", lambda f: ["search", "--data", f.folder], "not a recognized data folder"),
    R("search", "empty data set", lambda f: ["search", "--data", f.empty_data], "contains no images"),
    R("search", "no held-out split", lambda f: ["search", "--data", f.no_val], "no val/ or test/ folder"),
    R(
        "search",
        "mismatched classes",
        lambda f: ["search", "--data", f.mismatched_classes],
        r"class folder\(s\) \['bird'\] that .* lacks",
    ),
    R(
        "search",
        "corrupt image in data",
        lambda f: ["search", "--data", f.corrupt_image, "--arch", "fc"],
        r"cannot decode image .*broken\.png",
    ),
    # search: output
    R(
        "search",
        "output under a file",
        lambda f: ["search", "--arch", "fc", "--out", f.out_under_file],
        "cannot create output folder",
    ),
    R(
        "search",
        "output is a file",
        lambda f: ["search", "--arch", "fc", "--out", f.file_as_dir],
        "cannot create output folder .*: File exists|exists and is not a folder",
    ),
    R(
        "search",
        "unwritable output folder (simulated)",
        lambda f: ["search", "--arch", "fc", "--out", f.readonly_dir],
        "is not writable",
        _unwritable("readonly_dir"),
    ),
    R(
        "search",
        "full disk (simulated)",
        lambda f: ["search", "--arch", "fc", "--max-steps", "1", "--out", f.new_out],
        r"cannot write .*: No space left on device",
        _full_disk,
    ),
    R("search", "resume: no such run folder", lambda f: ["search", "--resume", f.missing], "no such run folder"),
    R("search", "resume: not a run folder", lambda f: ["search", "--resume", f.folder], "not a search run folder"),
    R(
        "search",
        "resume with overwrite",
        lambda f: ["search", "--resume", f.folder, "--overwrite"],
        "--overwrite does not apply with --resume",
    ),
    # inspect
    R("inspect", "missing file", lambda f: ["inspect", f.missing], "does not exist"),
    R("inspect", "a folder", lambda f: ["inspect", f.folder], "is a folder"),
    R("inspect", "text file", lambda f: ["inspect", f.text], "not a maskforge artifact"),
    R("inspect", "PNG image", lambda f: ["inspect", f.png], "not a maskforge artifact"),
    R("inspect", "empty file", lambda f: ["inspect", f.empty], r"not a maskforge artifact \(only 0 bytes\)"),
    R(
        "inspect",
        "truncated artifact",
        lambda f: ["inspect", f.truncated],
        r"truncated\.safetensors is truncated, or trailing data \(safetensors: incomplete metadata, file not fully "
        r"covered\)$",
    ),
    R("inspect", "corrupted tensor", lambda f: ["inspect", f.corrupted], r"tensor mask/\S+ does not match its digest"),
    R("inspect", "newer format version", lambda f: ["inspect", f.newer], "upgrade maskforge"),
    R("inspect", "k out of range in file", lambda f: ["inspect", f.bad_k], r"k\.safetensors: k must be > 0, got 0\.0$"),
    R(
        "inspect",
        "unreadable file (simulated)",
        lambda f: ["inspect", f.unreadable],
        "Permission denied",
        _unreadable("unreadable"),
    ),
    # verify
    R("verify", "missing file", lambda f: ["verify", f.missing], "does not exist"),
    R("verify", "text file", lambda f: ["verify", f.text], "not a maskforge artifact"),
    R(
        "verify",
        "corrupted tensor",
        lambda f: ["verify", f.corrupted],
        r"failed at tensor digests: tensor mask/\S+ does not match",
    ),
    R(
        "verify",
        "weight digest mismatch",
        lambda f: ["verify", f.weights_tampered],
        r"failed at weights: regenerated weights of layer 1\.weight .*digests\.weights\.1\.weight",
    ),
    R("verify", "newer format version", lambda f: ["verify", f.newer], "upgrade maskforge"),
    R("verify", "ONNX without --artifact", lambda f: ["verify", f.fake_onnx], "give the artifact"),
    R(
        "verify",
        "--artifact with an artifact",
        lambda f: ["verify", f.good, "--artifact", f.good],
        "is not an .onnx file",
    ),
    R("verify", "not an ONNX file", lambda f: ["verify", f.fake_onnx, "--artifact", f.good], "is not an ONNX model"),
    R(
        "verify",
        "unreadable file (simulated)",
        lambda f: ["verify", f.unreadable],
        "Permission denied",
        _unreadable("unreadable"),
    ),
    # export
    R("export", "missing artifact", lambda f: ["export", f.missing], "does not exist"),
    R("export", "text file", lambda f: ["export", f.text, "--out", f.onnx_out], "not a maskforge artifact"),
    R(
        "export",
        "corrupted artifact",
        lambda f: ["export", f.corrupted, "--out", f.onnx_out],
        "does not match its digest",
    ),
    R(
        "export",
        "weight digest mismatch",
        lambda f: ["export", f.weights_tampered, "--out", f.onnx_out],
        r"regenerated weights of layer 1\.weight",
    ),
    R("export", "unknown format", lambda f: ["export", f.good, "--format", "tflite"], "unknown --format 'tflite'"),
    R(
        "export",
        "opset out of range",
        lambda f: ["export", f.good, "--opset", "99", "--out", f.onnx_out],
        "opset must be an integer from",
    ),
    R(
        "export",
        "output folder under a file",
        lambda f: ["export", f.good, "--out", str(Path(f.text) / "m.onnx")],
        "is not a folder",
    ),
    R("export", "output is a folder", lambda f: ["export", f.good, "--out", f.folder], "is a folder"),
    R(
        "export",
        "unwritable output folder (simulated)",
        lambda f: ["export", f.good, "--out", str(Path(f.readonly_dir) / "m.onnx")],
        "not writable",
        _unwritable("readonly_dir"),
    ),
    R(
        "export",
        "full disk (simulated)",
        lambda f: ["export", f.good, "--out", f.onnx_out],
        r"cannot write .*: No space left on device",
        _full_disk,
    ),
    R(
        "export",
        "unreadable artifact (simulated)",
        lambda f: ["export", f.unreadable, "--out", f.onnx_out],
        "Permission denied",
        _unreadable("unreadable"),
    ),
    # eval
    R("eval", "missing model", lambda f: ["eval", f.missing], "does not exist"),
    R("eval", "a folder", lambda f: ["eval", f.folder], "is a folder"),
    R("eval", "not an ONNX file", lambda f: ["eval", f.fake_onnx], "not a readable ONNX model"),
    R("eval", "corrupted artifact", lambda f: ["eval", f.corrupted], "does not match its digest"),
    R("eval", "unknown split", lambda f: ["eval", f.good, "--split", "dev"], "unknown split 'dev'"),
    R("eval", "batch size 0", lambda f: ["eval", f.good, "--batch-size", "0"], "batch size must be a positive"),
    R("eval", "bad --mean", lambda f: ["eval", f.good, "--mean", "a,b"], "mean must be comma-separated numbers"),
    R("eval", "missing data folder", lambda f: ["eval", f.good, "--data", f.missing], "does not exist"),
    R(
        "eval",
        "mismatched sizes",
        lambda f: ["eval", f.good, "--data", "mnist5k"],
        "has 28x28 images, the model takes 8x8",
    ),
    R(
        "eval",
        "mismatched channels",
        lambda f: ["eval", f.good3ch, "--data", "mnist5k"],
        "has 1-channel images, the model takes 3",
    ),
    R(
        "eval",
        "mismatched classes",
        lambda f: ["eval", f.good28, "--data", "mnist5k"],
        "has 10 classes, the model predicts 3",
    ),
    R("eval", "report path is a folder", lambda f: ["eval", f.good, "--json", f.folder], "is a folder"),
    R(
        "eval",
        "report under a file",
        lambda f: ["eval", f.good, "--json", str(Path(f.text) / "r.json")],
        "is not a folder",
    ),
    R(
        "eval",
        "unreadable model (simulated)",
        lambda f: ["eval", f.unreadable],
        "Permission denied",
        _unreadable("unreadable"),
    ),
]


def _params() -> list:
    params = []
    for row in ROWS:
        marks = list(row.marks)
        if row.command not in COMMANDS:
            marks.append(pytest.mark.skip(reason=f"`maskforge {row.command}` is not in this checkout"))
        params.append(pytest.param(row, id=f"{row.command}-{row.case}", marks=marks))
    return params


def _check_user_error(result, row: Row) -> str:
    stderr = result.stderr
    lines = stderr.splitlines()
    assert "Traceback" not in stderr + result.stdout, stderr
    assert result.exit_code == 2, f"exit {result.exit_code}, stderr {stderr!r}, exception {result.exception!r}"
    assert len(lines) == 1 and lines[0].startswith("error: "), f"expected one 'error:' line, got {stderr!r}"
    assert re.search(row.message, lines[0]), f"{lines[0]!r} does not match {row.message!r}"
    return lines[0]


@pytest.mark.parametrize("row", _params())
def test_user_error_is_one_line_and_exit_2(row: Row, files: Files, monkeypatch):
    if row.setup is not None:
        row.setup(monkeypatch, files)
    result = CliRunner().invoke(app, row.argv(files))
    monkeypatch.undo()
    line = _check_user_error(result, row)
    shown = line.replace(str(files.root), "<tmp>")
    _TABLE.append((row.command, row.case, result.exit_code, shown[:150] + ("..." if len(shown) > 150 else "")))


# ---------------------------------------------------------------------------------------------------------
# real file permissions (meaningless as root: root reads and writes everything)
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.skipif(IS_ROOT, reason="root ignores file permissions; the simulated rows cover this")
@pytest.mark.parametrize("command", sorted({"inspect", "verify", "export", "eval"} & COMMANDS))
def test_really_unreadable_file(command, files: Files, tmp_path):
    target = tmp_path / "locked.safetensors"
    shutil.copy(files.good, target)
    target.chmod(0)
    try:
        result = CliRunner().invoke(app, [command, str(target)])
    finally:
        target.chmod(0o600)
    _check_user_error(result, Row(command, "unreadable", lambda f: [], "Permission denied|cannot read"))


@pytest.mark.skipif(IS_ROOT, reason="root ignores file permissions; the simulated rows cover this")
def test_really_unwritable_output_folder(files: Files, tmp_path):
    folder = tmp_path / "locked"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        result = CliRunner().invoke(app, ["search", "--arch", "fc", "--out", str(folder)])
    finally:
        folder.chmod(0o700)
    _check_user_error(result, Row("search", "unwritable", lambda f: [], "not writable"))


# ---------------------------------------------------------------------------------------------------------
# unexpected failures: exit 1, one line with a hint; --debug shows the traceback
# ---------------------------------------------------------------------------------------------------------


def _boom(*args, **kwargs):
    raise RuntimeError("injected failure")


def test_unexpected_error_exits_1_with_a_hint(files: Files, monkeypatch):
    monkeypatch.setattr("maskforge.artifact.inspect_artifact", _boom)  # imported when the command runs
    result = CliRunner().invoke(app, ["inspect", files.good])
    lines = result.stderr.splitlines()
    assert result.exit_code == 1
    assert len(lines) == 1 and lines[0].startswith("error: unexpected RuntimeError: injected failure")
    assert "--debug" in lines[0] and "Traceback" not in result.stderr


def test_debug_lets_the_exception_through(files: Files, monkeypatch):
    monkeypatch.setattr("maskforge.artifact.inspect_artifact", _boom)  # imported when the command runs
    result = CliRunner().invoke(app, ["--debug", "inspect", files.good])
    assert result.exit_code == 1
    assert isinstance(result.exception, RuntimeError)  # the runner caught what would print a traceback


# ---------------------------------------------------------------------------------------------------------
# the real executable: real stderr, real exit codes
# ---------------------------------------------------------------------------------------------------------

_INJECT = (
    "import sys, maskforge.artifact as m\n"
    "def boom(*a, **k):\n    raise RuntimeError('injected failure')\n"
    "m.inspect_artifact = boom\n"
    "from maskforge.cli import main\n"
    "sys.argv = ['maskforge'] + sys.argv[1:]\nmain()\n"
)


def test_real_processes(files: Files):
    # Three processes (each imports torch: seconds of CPU); the in-process table covers the rest.
    executable = str(EXECUTABLE) if EXECUTABLE.exists() else shutil.which("maskforge")
    assert executable, "the maskforge console script is not installed"
    runs = {
        "verify corrupted": (
            [executable, "verify", files.corrupted],
            2,
            r"^error: verification of .* failed at "
            r"tensor digests",
        ),
        "unexpected": (
            [sys.executable, "-c", _INJECT, "inspect", files.good],
            1,
            r"^error: unexpected RuntimeError: injected failure .*--debug",
        ),
        "unexpected --debug": (
            [sys.executable, "-c", _INJECT, "--debug", "inspect", files.good],
            1,
            r"Traceback \(most recent call last\)",
        ),
    }
    env = {**os.environ, "MASKFORGE_DEBUG": "", "COLUMNS": "200"}
    procs = {
        name: subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        for name, (argv, _, _) in runs.items()
    }
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=300)
        _, code, pattern = runs[name]
        assert proc.returncode == code, (name, proc.returncode, stderr)
        if name.endswith("--debug"):
            assert re.search(pattern, stderr) and "RuntimeError: injected failure" in stderr, stderr
        else:
            assert len(stderr.splitlines()) == 1 and re.search(pattern, stderr.strip()), (name, stderr)
            assert "Traceback" not in stderr


# ---------------------------------------------------------------------------------------------------------
# maskforge verify: the OK path and ONNX checks against the source artifact
# ---------------------------------------------------------------------------------------------------------


def test_verify_ok_lists_every_check(files: Files):
    result = CliRunner().invoke(app, ["verify", files.good])
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == f"OK {files.good}"
    checks = [line.split(":")[0].strip() for line in lines[1:]]
    assert checks[:8] == [
        "file",
        "header",
        "schema",
        "document digest",
        "tensor digests",
        "structure",
        "masks",
        "weights",
    ]
    assert lines[-1].startswith("  artifact digest: ")
    report = json.loads(CliRunner().invoke(app, ["verify", files.good, "--json"]).stdout)
    assert report["ok"] and len(report["checks"]) == 8


@pytest.fixture(scope="module")
def exported(files: Files):
    export = pytest.importorskip("maskforge.export")
    dense = export.export_onnx(files.good, files.root / "good.dense.onnx", storage="dense").path
    compact = export.export_onnx(files.good, files.root / "good.onnx", storage="compact").path
    return dense, compact


def _edited_onnx(source: Path, dest: Path, edit: Callable) -> Path:
    import onnx

    proto = onnx.load(str(source))
    edit(proto)
    dest.write_bytes(proto.SerializeToString())
    return dest


def test_verify_onnx_against_its_artifact(files: Files, exported):
    for onnx_path in exported:
        result = CliRunner().invoke(app, ["verify", str(onnx_path), "--artifact", files.good])
        assert result.exit_code == 0, result.stderr
        assert "onnx outputs: onnxruntime logits equal" in result.stdout


def test_verify_onnx_detects_the_wrong_artifact(files: Files, exported):
    other = _artifact(files.root / "other.safetensors", seed=4)  # the same architecture, another network
    result = CliRunner().invoke(app, ["verify", str(exported[1]), "--artifact", str(other)])
    assert result.exit_code == 2
    assert re.search(
        r"failed at onnx metadata: metadata field maskforge\.artifact_digest .* different artifact", result.stderr
    ), result.stderr


def test_verify_onnx_detects_edited_weights_and_metadata(files: Files, exported):
    from onnx import numpy_helper

    def bump_weight(proto):
        for index, tensor in enumerate(proto.graph.initializer):
            array = numpy_helper.to_array(tensor)
            if array.ndim == 2 and array.size > 10:
                array = array.copy()
                array.flat[int(np.flatnonzero(array)[0])] *= 50.0
                proto.graph.initializer[index].CopyFrom(numpy_helper.from_array(array, tensor.name))
                return
        raise AssertionError("no weight initializer found")

    def edit_seed(proto):
        for prop in proto.metadata_props:
            if prop.key == "maskforge.seed":
                prop.value = "12345"

    weights = _edited_onnx(exported[0], files.root / "bumped.onnx", bump_weight)
    result = CliRunner().invoke(app, ["verify", str(weights), "--artifact", files.good])
    assert result.exit_code == 2 and "failed at onnx outputs" in result.stderr, result.stderr
    seed = _edited_onnx(exported[1], files.root / "seed.onnx", edit_seed)
    result = CliRunner().invoke(app, ["verify", str(seed), "--artifact", files.good])
    assert result.exit_code == 2 and "metadata field maskforge.seed is '12345'" in result.stderr, result.stderr

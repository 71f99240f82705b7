"""`maskforge export` given something that is not an artifact, and `--out` into folders that do not exist yet
(issue 10, item 13): the file is named for what it is, with the command that takes it; a missing output
folder is created (as `search` and `eval --json` do), only below a writable folder, and removed again when
the export fails."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pytest
from helpers import one_error_line
from PIL import Image
from safetensors.numpy import save_file
from typer.testing import CliRunner

from maskforge.cli.app import app
from maskforge.errors import MaskforgeError
from maskforge.export import export_onnx, export_torch
from test_export import make_artifact


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("inputs")
    artifact = make_artifact(root, "fc", 1, 8, name="artifact.safetensors")
    run = root / "run"
    run.mkdir()
    (run / "artifact.safetensors").write_bytes(artifact.read_bytes())
    checkpoint = root / "checkpoint.safetensors"
    save_file({"scores": np.zeros(4, dtype=np.float32)}, str(checkpoint), metadata={"maskforge_checkpoint": "{}"})
    image = root / "digit.png"
    Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(image)
    return {
        "artifact": artifact,
        "run folder": run,
        "checkpoint": checkpoint,
        "image": image,
        "torch export": export_torch(artifact, root / "artifact.torch.safetensors").path,
        "onnx": export_onnx(artifact, root / "artifact.onnx").path,
    }


def _one_error_line(result, pattern: str) -> str:
    return one_error_line(result, "^(?:" + pattern + ")")  # the patterns here match from the line's start


def _tree(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


WRONG_FILES = {
    "torch export": r"is a maskforge PyTorch export \(a plain state dict\), not a maskforge artifact: reload it in "
    r"Python with maskforge\.load_torch_export",
    "onnx": r"is an ONNX model \(a maskforge export: storage regen, precision fp32\), not a maskforge artifact: "
    r"`maskforge eval .*artifact\.onnx` evaluates it",
    "checkpoint": r"is a maskforge search checkpoint, not a maskforge artifact: `maskforge search --resume FOLDER` "
    r"continues the run",
    "image": r"is a PNG image, not a maskforge artifact: `maskforge predict MODEL .*digit\.png` classifies it",
    "run folder": r"is a folder, not a maskforge artifact: .*run/artifact\.safetensors",
}


@pytest.mark.parametrize("kind", sorted(WRONG_FILES))
def test_export_of_a_file_that_is_not_an_artifact_says_what_it_is_and_what_takes_it(files, kind, tmp_path):
    out = tmp_path / "model.onnx"
    line = _one_error_line(
        CliRunner().invoke(app, ["export", str(files[kind]), "--out", str(out)]),
        rf"^error: {re.escape(str(files[kind]))} {WRONG_FILES[kind]}",
    )
    assert "dtype" not in line and "safetensors file but" not in line
    assert _tree(tmp_path) == []


def test_export_out_creates_missing_folders(files, tmp_path):
    out = tmp_path / "exports" / "conv" / "model.onnx"
    result = CliRunner().invoke(app, ["export", str(files["artifact"]), "--out", str(out)])
    assert result.exit_code == 0, result.stderr
    assert out.is_file() and out.read_bytes() != b""
    torch_out = tmp_path / "torch" / "model.safetensors"
    assert export_torch(files["artifact"], torch_out).path == torch_out and torch_out.is_file()


def test_a_failed_export_leaves_no_folder_it_created(files, tmp_path, monkeypatch):
    import maskforge.export.onnx_export as onnx_export

    def fail(*args, **kwargs):
        raise MaskforgeError("the check failed (injected)")

    monkeypatch.setattr(onnx_export, "float_parity", fail)
    (tmp_path / "kept").mkdir()
    with pytest.raises(MaskforgeError, match="injected"):
        export_onnx(files["artifact"], tmp_path / "kept" / "new" / "deeper" / "model.onnx")
    assert _tree(tmp_path) == ["kept"]


def test_missing_folders_only_below_a_writable_folder(files, tmp_path, monkeypatch):
    under_file = tmp_path / "notes.txt"
    under_file.write_text("x")
    _one_error_line(
        CliRunner().invoke(app, ["export", str(files["artifact"]), "--out", str(under_file / "sub" / "model.onnx")]),
        r"^error: cannot write .*model\.onnx: output path .*notes\.txt exists and is not a folder$",
    )
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access  # simulated (root may write anywhere): the folder refuses writing

    def access(path, mode, *args, **kwargs):
        return False if Path(path) == locked and mode & os.W_OK else real_access(path, mode, *args, **kwargs)

    monkeypatch.setattr(os, "access", access)
    _one_error_line(
        CliRunner().invoke(app, ["export", str(files["artifact"]), "--out", str(locked / "new" / "model.onnx")]),
        r"^error: cannot write .*model\.onnx: output folder .*locked is not writable$",
    )
    assert _tree(locked) == []

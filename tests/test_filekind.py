"""`file_kind`: what a file is, from its bytes (not its name), for messages such as `inspect model.onnx`."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from PIL import Image
from safetensors.numpy import save_file

from eval_helpers import searched_fc
from maskforge.checkpoint import METADATA_KEY as CHECKPOINT_KEY
from maskforge.export import export_torch
from maskforge.filekind import file_kind


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return searched_fc(tmp_path_factory.mktemp("kinds"), steps=3)


def test_each_kind_is_recognized_by_content(run, tmp_path):
    export_torch(run / "artifact.safetensors", tmp_path / "t.safetensors")
    save_file({"x": np.zeros(3, dtype=np.float32)}, str(tmp_path / "plain.safetensors"))
    # a finished run may delete its checkpoint: a file with a checkpoint's metadata key stands in for one
    save_file({"x": np.zeros(3, dtype=np.float32)}, str(tmp_path / "ckpt.safetensors"), metadata={CHECKPOINT_KEY: "{}"})
    proto = onnx.load(str(run / "model.dense.onnx"))
    del proto.metadata_props[:]
    onnx.save(proto, str(tmp_path / "bare.bin"))  # ONNX under another name: found by content
    (run / "model.onnx").rename(tmp_path / "renamed.safetensors")
    Image.fromarray(np.zeros((4, 4), dtype=np.uint8)).save(tmp_path / "image.onnx", format="PNG")
    (tmp_path / "notes.onnx").write_text("not a model")
    expected = {
        run / "artifact.safetensors": ("artifact", "a maskforge artifact"),
        tmp_path / "ckpt.safetensors": ("checkpoint", "a maskforge search checkpoint"),
        tmp_path / "t.safetensors": ("torch_export", "a maskforge PyTorch export (a plain state dict)"),
        tmp_path / "plain.safetensors": ("safetensors", "a safetensors file without maskforge metadata"),
        tmp_path / "bare.bin": ("onnx", "an ONNX model (without maskforge metadata)"),
        tmp_path / "renamed.safetensors": (
            "onnx",
            "an ONNX model (a maskforge export: storage compact, precision fp32)",
        ),
        tmp_path / "image.onnx": ("image", "a PNG image"),
        tmp_path / "notes.onnx": ("unknown", "not a file maskforge recognizes"),
        tmp_path / "missing": ("missing", "missing"),
        tmp_path: ("folder", "a folder"),
    }
    for path, (kind, description) in expected.items():
        got = file_kind(path)
        assert (got.kind, got.description) == (kind, description), path

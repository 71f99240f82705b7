"""int8 on a really searched network, end to end: search conv4 on the demo data, export int8, and
compare with the fp32 network on the held-out split (slow: the search takes minutes on 2 cores).

The oracle is the materialized PyTorch network's own predictions on the same 1,000 held-out images,
computed here, not the figures the export reports.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from typer.testing import CliRunner

from maskforge import load_artifact
from maskforge.cli import app
from maskforge.data import load_data, normalize
from maskforge.materialization import materialize

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("storage", ["regen"])
def test_int8_matches_fp32_on_the_demo_heldout_split(tmp_path, storage):
    runner = CliRunner()
    out = tmp_path / "conv4"
    result = runner.invoke(
        app, ["search", "--arch", "conv4", "--k", "0.5", "--epochs", "3", "--out", str(out), "--quiet"]
    )
    assert result.exit_code == 0, result.output
    artifact = out / "artifact.safetensors"
    int8_path = tmp_path / "conv4.int8.onnx"
    result = runner.invoke(
        app, ["export", str(artifact), "--storage", storage, "--precision", "int8", "--out", str(int8_path)]
    )
    assert result.exit_code == 0, result.output

    splits = load_data("mnist5k")
    model = materialize(artifact)
    images = normalize(splits.heldout.images, load_artifact(artifact).spec)
    labels = splits.heldout.labels.numpy()
    with torch.no_grad():
        fp32 = model(images).argmax(1).numpy()
    session = ort.InferenceSession(str(int8_path), providers=["CPUExecutionProvider"])
    int8 = np.concatenate(
        [session.run(None, {"input": images[i : i + 250].numpy()})[0].argmax(1) for i in range(0, len(images), 250)]
    )
    assert len(labels) == 1000
    top1_fp32, top1_int8 = (fp32 == labels).mean(), (int8 == labels).mean()
    assert abs(top1_int8 - top1_fp32) <= 0.003, (top1_int8, top1_fp32)
    assert (int8 == fp32).mean() >= 0.98

"""A widened network end to end: search records `width` in arch.args, and the artifact loads, verifies,
materializes and exports like any other (issue 12: width is an architecture argument)."""

from __future__ import annotations


import numpy as np
import onnxruntime
import pytest
import torch

from maskforge.artifact import load_artifact
from maskforge.errors import MaskforgeError
from maskforge.export import export_onnx
from maskforge.materialization import materialize
from maskforge.searches import SearchConfig, search
from maskforge.verify import verify_artifact


@pytest.fixture(scope="module")
def widened(tmp_path_factory):
    out = tmp_path_factory.mktemp("width") / "run"
    config = SearchConfig(arch="fc", width=0.5, k=0.5, epochs=1, max_steps=2, batch_size=64, device="cpu", out=str(out))
    return search(config)


def test_search_records_the_width_and_the_artifact_rebuilds_it(widened):
    artifact = load_artifact(widened.artifact_path)
    assert artifact.arch_args == {"in_channels": 1, "num_classes": 10, "image_size": [28, 28], "width": 0.5}
    assert {name: tuple(mask.shape) for name, mask in artifact.masks.items()} == {
        "1.weight": (150, 784),
        "3.weight": (50, 150),
        "5.weight": (10, 50),
    }
    assert verify_artifact(widened.artifact_path).ok
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(materialize(artifact)(x), artifact.create_model()(x), rtol=1e-5, atol=1e-5)


def test_widened_artifact_exports_to_onnx(widened, tmp_path):
    exported = export_onnx(widened.artifact_path, tmp_path / "fc.onnx")
    session = onnxruntime.InferenceSession(str(exported.path), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((2, 1, 28, 28)).astype(np.float32)
    (logits,) = session.run(None, {session.get_inputs()[0].name: x})
    with torch.no_grad():
        expected = materialize(widened.artifact_path)(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4)


def test_width_in_a_search_config_is_checked(tmp_path):
    for width, message in (
        (0, "search config: width must be > 0, got 0"),
        (64.5, "search config: width must be <= 64, got 64.5"),
    ):
        with pytest.raises(MaskforgeError) as info:
            SearchConfig(arch="fc", width=width)
        assert str(info.value) == message
    assert SearchConfig().width is None  # not chosen: the architecture's width (1)
    out = tmp_path / "resnet"
    with pytest.raises(MaskforgeError, match="^width 2: architecture resnet18 has fixed widths"):
        search(SearchConfig(arch="resnet18", width=2.0, epochs=1, max_steps=1, device="cpu", out=str(out)))
    assert not out.exists()  # refused before the run folder was written


def test_search_command_has_width_and_topk_options():
    from typer.testing import CliRunner

    from maskforge.cli import app

    output = CliRunner().invoke(app, ["search", "--help"], env={"COLUMNS": "300"}).output
    lines = {line.split()[1]: " ".join(line.split()[2:-1]) for line in output.splitlines() if line.startswith("│ --")}
    assert lines["--width"] == (
        "<float> Width multiplier W of the conv and fc networks: each hidden layer gets "
        "max(1, round(W x its units)); the ResNets take only 1 (default: the architecture's, 1)."
    )
    assert lines["--topk"] == (
        "<str> Top-k rule: layer (k in every layer, the paper's) or global (one threshold over "
        "all layers, each keeps at least 1). [default: layer]"
    )
    result = CliRunner().invoke(app, ["search", "--width", "0", "--out", "unused"])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == ["error: --width must be > 0, got 0.0"]

"""The issues' headline claims, end to end through the real command line on the real demo data.

These run the full searches (minutes on a 2-core CPU), so they are marked slow: `pytest -m slow`.
They check the accuracy targets and that the deployed ONNX models classify the held-out split exactly
as the searched network did.
"""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from maskforge.cli import app

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("arch, epochs, target", [("conv4", 10, 0.975), ("fc", 30, 0.945)])
def test_search_export_eval_on_the_demo_data(tmp_path, arch, epochs, target):
    runner = CliRunner()
    out = tmp_path / arch
    result = runner.invoke(app, ["search", "--arch", arch, "--k", "0.5", "--epochs", str(epochs),
                                 "--out", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    heldout = metrics[-1]["heldout_acc"]
    assert heldout >= target, f"{arch}: held-out accuracy {heldout:.4f} below the target {target}"

    reports = {}
    for layout in ("compact", "dense"):
        onnx_path = out / f"{arch}.{layout}.onnx"
        result = runner.invoke(app, ["export", str(out / "artifact.safetensors"), f"--{layout}",
                                     "--out", str(onnx_path)])
        assert result.exit_code == 0, result.output
        report_path = out / f"{layout}.json"
        result = runner.invoke(app, ["eval", str(onnx_path), "--json", str(report_path)])
        assert result.exit_code == 0, result.output
        reports[layout] = json.loads(report_path.read_text())
    # onnxruntime classifies exactly as the search's held-out evaluation did, for both layouts
    for report in reports.values():
        assert report["accuracy"]["examples"] == 1000
        assert report["accuracy"]["correct"] == round(heldout * 1000)
    # the artifact itself, evaluated with PyTorch beside onnxruntime: the same examples are correct
    result = runner.invoke(app, ["eval", str(out / "artifact.safetensors"), "--json", str(out / "art.json")])
    assert result.exit_code == 0, result.output
    artifact_report = json.loads((out / "art.json").read_text())
    assert (artifact_report["agreement"]["reference_correct"] == artifact_report["accuracy"]["correct"]
            == round(heldout * 1000))

"""onnxruntime's own logging: a model that fails while running must leave exactly one line on stderr,
maskforge's `error:` line. onnxruntime writes its `[E:onnxruntime ...]` lines to file descriptor 2 from C++,
past Python's `sys.stderr`, so these tests capture the descriptor itself (`capfd`)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper
from typer.testing import CliRunner

from maskforge.cli.app import app
from maskforge.errors import MaskforgeError
from maskforge.export import export_onnx, ort_session
from maskforge.export.sessions import run_session
from eval_helpers import edited_to_fail_while_running
from test_export import make_artifact


@pytest.fixture(scope="module")
def edited(tmp_path_factory) -> tuple[Path, Path]:
    """(artifact, its dense export edited so that it loads but fails inside onnxruntime while running)."""
    folder = tmp_path_factory.mktemp("ortlog")
    artifact = make_artifact(folder, "fc", 1, 8)
    dense = export_onnx(artifact, folder / "dense.onnx", storage="dense").path
    return artifact, edited_to_fail_while_running(dense, folder / "edited.onnx")


def _images() -> np.ndarray:
    return np.zeros((2, 1, 8, 8), dtype=np.float32)


def test_a_default_session_logs_the_failure_itself(edited, capfd):
    """What the helper must prevent: onnxruntime's default severity prints its own error line."""
    session = ort.InferenceSession(str(edited[1]), providers=["CPUExecutionProvider"])
    capfd.readouterr()
    with pytest.raises(Exception, match="MatMul"):
        session.run(None, {"input": _images()})
    assert re.search(r"\[E:onnxruntime", capfd.readouterr().err)


def test_the_shared_session_helper_keeps_stderr_silent(edited, capfd):
    session = ort_session(edited[1])
    capfd.readouterr()
    with pytest.raises(Exception, match="MatMul"):
        run_session(session, _images())
    assert capfd.readouterr().err == ""


def test_a_model_onnxruntime_cannot_load_is_one_clear_error_and_no_log(tmp_path, capfd):
    broken = tmp_path / "broken.onnx"
    graph = helper.make_graph(
        [helper.make_node("NoSuchOp", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=8), str(broken))
    capfd.readouterr()
    pattern = rf"^onnxruntime cannot load {re.escape(str(broken))}: .*NoSuchOp"
    with pytest.raises(MaskforgeError, match=pattern) as caught:
        ort_session(broken)
    assert "[ONNXRuntimeError]" not in str(caught.value) and "\n" not in str(caught.value)
    assert capfd.readouterr().err == ""


def test_verify_of_an_edited_model_prints_exactly_one_line(edited, capfd):
    artifact, model = edited
    capfd.readouterr()
    result = CliRunner().invoke(app, ["verify", str(model), "--artifact", str(artifact)])
    assert result.exit_code == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and re.match(
        r"error: verification of .*edited\.onnx failed at onnx outputs: onnxruntime "
        r"cannot run the model: Non-zero status code .*MatMul",
        lines[0],
    ), lines
    assert capfd.readouterr().err == ""

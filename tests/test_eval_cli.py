"""`maskforge eval` and the eval side of `maskforge inspect` through the command line: the report files
(JSON into folders that do not exist yet, the confusion-matrix PNG), the tables, `--compare`, and bad input
(one `error:` line, exit 2, nothing left behind), including a model whose input size does not fit the
preprocessing, with onnxruntime's own logging to file descriptor 2 checked too."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import onnx
import pytest
from PIL import Image
from typer.testing import CliRunner

from eval_helpers import edited_to_fail_while_running, searched_fc
from helpers import one_error_line
from maskforge.cli import app


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("evalcli")
    searched_fc(out, steps=10)
    return out


def _folder(root: Path, classes: list[str], mode: str, size: int = 28) -> Path:
    for split in ("train", "val"):
        for name in classes:
            (root / split / name).mkdir(parents=True, exist_ok=True)
            pixels = np.zeros((size, size, 3) if mode == "RGB" else (size, size), dtype=np.uint8)
            Image.fromarray(pixels, mode).save(root / split / name / "0.png")
    return root


def test_report_json_and_png_go_into_new_folders(run, tmp_path):
    report_path, png_path = tmp_path / "new" / "deeper" / "report.json", tmp_path / "figs" / "confusion.png"
    result = CliRunner().invoke(
        app,
        [
            "eval",
            str(run / "model.onnx"),
            "--batch-size",
            "32",
            "--threads",
            "1",
            "--latency-runs",
            "3",
            "--json",
            str(report_path),
            "--confusion-png",
            str(png_path),
        ],
    )
    assert result.exit_code == 0, result.stderr
    report = json.loads(report_path.read_text())
    assert report["format"] == "maskforge-eval-report" and report["accuracy"]["examples"] == 1000
    confusion = np.array(report["accuracy"]["confusion"])
    assert confusion.shape == (10, 10) and confusion.sum(axis=1).tolist() == [100] * 10  # 100 per digit
    assert int(np.trace(confusion)) == report["accuracy"]["correct"]
    assert [c["correct"] for c in report["accuracy"]["per_class"]] == np.diag(confusion).tolist()
    assert {(t["batch"], t["runs"]) for t in report["timing"]["latency"]} == {(1, 3), (32, 3)}
    with Image.open(png_path) as image:
        assert image.format == "PNG" and min(image.size) >= 300
        assert len(np.unique(np.asarray(image.convert("L")))) > 10  # something was drawn
    text = " ".join(result.stdout.split())
    assert "top-1 (onnxruntime)" in text and "top-5 (onnxruntime)" in text
    assert "per-class accuracy and confusion matrix" in text and "does not speed up dense kernels" in text


def test_json_to_stdout_and_the_compare_table(run):
    result = CliRunner().invoke(app, ["eval", str(run / "artifact.safetensors"), "--no-latency", "--json", "-"])
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["model"]["kind"] == "artifact" and report["agreement"]["argmax_agreement"] == 1.0
    assert report["timing"] is None
    result = CliRunner().invoke(
        app,
        ["eval", str(run / "artifact.safetensors"), "--compare", "--no-latency", "--threads", "1"],
        env={"COLUMNS": None},
    )  # as in a file: no width
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    header = " ".join(lines[:6])
    assert all(f"{storage}" in header for storage in ("dense", "compact", "regen"))
    assert re.search(r"fp32\W+fp32\W+fp32\W+int8\W+int8\W+int8", " ".join(lines[:8])), lines[:8]
    agreement = next(line for line in lines if "agreement with float32" in line)
    cells = re.findall(r"\d+\.\d\d%", agreement)
    assert len(cells) == 6 and cells[:3] == ["100.00%"] * 3, agreement  # fp32 modes: the float32 network
    rows = [line for line in lines if line.startswith("│")]  # one line per row: nothing wrapped (issue 17)
    assert len(rows) == 12 and all(row.split("│")[1].strip() for row in rows), rows  # no continuation lines
    assert [row.split("│")[1].strip() for row in rows][-4:] == [
        "top-1",
        "top-5",
        "agreement with float32",
        "Δ top-1 (points)",
    ], rows
    assert "against PyTorch, the materialized artifact" in " ".join(result.stdout.split())


def test_inspect_of_an_onnx_file_says_what_it_is_and_what_takes_it(run):
    line = one_error_line(
        CliRunner().invoke(app, ["inspect", str(run / "model.onnx")]),
        r"is an ONNX model \(a maskforge export: storage compact, precision fp32\), not a "
        r"maskforge artifact: `maskforge eval .*model.onnx` evaluates it",
    )
    assert "maskforge predict" in line and "maskforge verify" in line


@pytest.mark.parametrize(
    "case",
    [
        "truncated onnx",
        "png named .onnx",
        "no metadata",
        "rgb images",
        "other class names",
        "json under a file",
        "wrong size",
        "artifact, wrong size",
        "compare an onnx",
        "compare with --size",
        "zero latency runs",
    ],
)
def test_bad_input_is_one_line_exit_2_and_leaves_nothing(run, tmp_path, case):
    model, extra = run / "model.onnx", []
    if case == "truncated onnx":
        model = tmp_path / "cut.onnx"
        data = (run / "model.onnx").read_bytes()
        model.write_bytes(data[: len(data) * 2 // 3])
    elif case == "png named .onnx":
        model = tmp_path / "photo.onnx"
        Image.fromarray(np.zeros((4, 4), dtype=np.uint8)).save(model, format="PNG")
    elif case == "no metadata":
        proto = onnx.load(str(run / "model.dense.onnx"))
        del proto.metadata_props[:]
        model = tmp_path / "bare.onnx"
        onnx.save(proto, str(model))
        extra = ["--mean", "0.1"]
    elif case == "rgb images":
        extra = ["--data", str(_folder(tmp_path / "rgb", [str(d) for d in range(10)], "RGB"))]
    elif case == "other class names":
        extra = ["--data", str(_folder(tmp_path / "letters", list("abcdefghij"), "L"))]
    elif case == "json under a file":
        (tmp_path / "plain").write_text("x")
        extra = ["--json", str(tmp_path / "plain" / "r.json")]
    elif case == "wrong size":  # issue 10 item 11: was an onnxruntime traceback and exit 1
        extra = ["--data", str(_folder(tmp_path / "digits", [str(d) for d in range(10)], "L")), "--size", "32"]
    elif case == "artifact, wrong size":
        model, extra = run / "artifact.safetensors", ["--size", "32"]
    elif case == "compare an onnx":
        extra = ["--compare"]
    elif case == "compare with --size":
        model, extra = run / "artifact.safetensors", ["--compare", "--size", "28"]
    else:
        extra = ["--latency-runs", "0"]
    before = sorted(p.name for p in tmp_path.rglob("*"))
    result = CliRunner().invoke(app, ["eval", str(model), "--latency-runs", "1", *extra])
    expected = {
        "truncated onnx": "not a readable ONNX model|not a valid ONNX model",
        "png named .onnx": r"photo.onnx is a PNG image; give the artifact or an ONNX export",
        "no metadata": "give --std",
        "rgb images": "3-channel images, the model takes 1",
        "other class names": "has classes a, b",
        "json under a file": "is not a folder",
        "wrong size": r"model.onnx takes 1x28x28 images \(its ONNX input 'input' is \[batch, 1, 28, 28\]\), "
        r"but the preprocessing gives 1x32x32",
        "artifact, wrong size": r"artifact.safetensors takes 1x28x28 images; size 32 does not apply",
        "compare an onnx": "comparing export modes needs the artifact",
        "compare with --size": "--size does not apply with --compare",
        "zero latency runs": "latency runs must be at least 1",
    }[case]
    one_error_line(result, expected)
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


def test_a_model_that_fails_inside_onnxruntime_is_one_line(run, tmp_path, capfd):
    """A foreign ONNX file whose graph leaves the image side open but needs 28x28 inside: with size 32
    onnxruntime fails mid-run (issue 10 item 11: a traceback and exit 1). Exactly one line must reach
    stderr: `capfd` also sees what onnxruntime's C++ logger writes to file descriptor 2 by itself."""
    proto = onnx.load(str(run / "model.dense.onnx"))
    del proto.metadata_props[:]
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    dims[2].dim_param, dims[3].dim_param = "height", "width"
    del proto.graph.value_info[:]
    model = tmp_path / "open_size.onnx"
    onnx.save(proto, str(model))
    image = tmp_path / "digit.png"
    Image.fromarray(np.zeros((28, 28), dtype=np.uint8)).save(image)
    options = ["--mean", "0.13", "--std", "0.3", "--size", "32"]
    pattern = (
        r"onnxruntime cannot run .*open_size.onnx on a float32 batch of shape \[\d+, 1, 32, 32\]: .*MatMul.* "
        r"\(the model does not fit the preprocessing given"
    )
    data = _folder(tmp_path / "d", [str(i) for i in range(10)], "L")
    capfd.readouterr()
    for command in (["eval", str(model), "--data", str(data)], ["predict", str(model), str(image)]):
        one_error_line(CliRunner().invoke(app, [*command, *options]), pattern)
        native = capfd.readouterr()
        assert native.err == "" and native.out == "", native
    # an edited maskforge export (metadata intact, a Slice cutting the image before the MatMul, open sides so
    # that onnxruntime cannot see it at load): the file's fault, not maskforge's, so exit 2 as well
    edited_to_fail_while_running(run / "model.dense.onnx", tmp_path / "edited.onnx")
    one_error_line(
        CliRunner().invoke(app, ["eval", str(tmp_path / "edited.onnx"), "--no-latency"]),
        r"onnxruntime cannot run .*edited.onnx .*\(its graph does not fit its own maskforge metadata: a "
        r"damaged or edited file\?\)",
    )
    assert capfd.readouterr().err == ""

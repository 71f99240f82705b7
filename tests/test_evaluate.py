"""Tests for evaluate: accuracy against an independent PyTorch computation on the demo data, the report's
fields (latency, sizes, parameters, MACs), ONNX files with and without metadata, and bad inputs through
the command line (one `error:` line, exit 2, nothing left behind)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from maskforge.artifact import load_artifact
from maskforge.cli import app
from maskforge.data import load_data
from maskforge.errors import MaskforgeError
from maskforge.evaluate import evaluate
from maskforge.export import export_onnx
from maskforge.search import SearchConfig, search

FC_MACS_28 = 784 * 300 + 300 * 100 + 100 * 10  # LeNet 300-100 on 1x28x28: one MAC per weight


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A short real search of the MLP on the demo data (a few seconds): artifact + its ONNX exports."""
    out = tmp_path_factory.mktemp("eval")
    result = search(SearchConfig(arch="fc", k=0.5, epochs=1, max_steps=15, batch_size=128, out=str(out)),
                    progress=False)
    export_onnx(result.artifact_path, out / "model.onnx", compact=True)
    export_onnx(result.artifact_path, out / "model.dense.onnx", compact=False)
    return out


def _independent_accuracy(artifact_path: Path) -> tuple[int, int, int]:
    """Oracle: the masked search-time model (not the materialized one, not onnxruntime) on the held-out
    split, normalized here with numpy from the artifact's spec. Returns (examples, top-1 hits, top-5 hits)."""
    artifact = load_artifact(artifact_path)
    model = artifact.create_model()
    heldout = load_data("mnist5k").heldout
    images = heldout.images.numpy().astype(np.float32) / np.float32(255)
    mean = np.asarray(artifact.spec.mean, dtype=np.float32).reshape(1, -1, 1, 1)
    std = np.asarray(artifact.spec.std, dtype=np.float32).reshape(1, -1, 1, 1)
    x = torch.from_numpy((images - mean) / std)
    with torch.no_grad():
        logits = model(x)
    labels = heldout.labels
    top5 = logits.topk(5, dim=1).indices
    return len(labels), int((top5[:, 0] == labels).sum()), int((top5 == labels[:, None]).any(1).sum())


def test_artifact_accuracy_matches_an_independent_pytorch_computation(run):
    report = evaluate(run / "artifact.safetensors", batch_size=100, latency=False)
    examples, top1, top5 = _independent_accuracy(run / "artifact.safetensors")
    assert report["examples"] == examples == 1000
    assert report["correct"] == top1 and report["correct_top5"] == top5
    assert report["top1"] == pytest.approx(top1 / examples) and report["top5"] == pytest.approx(top5 / examples)
    # the materialized model in PyTorch and onnxruntime agree example for example
    assert report["torch_correct"] == report["correct"] and report["argmax_agreement"] == 1.0
    # ... and with the held-out accuracy the search recorded
    assert report["search_heldout_acc"] == pytest.approx(report["top1"])


def test_onnx_files_give_the_same_accuracy_and_read_their_metadata(run):
    artifact = load_artifact(run / "artifact.safetensors")
    compact = evaluate(run / "model.onnx", batch_size=128, latency=False)
    dense = evaluate(run / "model.dense.onnx", batch_size=7, latency=False)  # a batch that does not divide
    _, top1, _ = _independent_accuracy(run / "artifact.safetensors")
    for report, layout in ((compact, "compact"), (dense, "dense")):
        assert report["correct"] == top1 and report["model_kind"] == "onnx"
        assert report["onnx_format"] == layout and report["arch"] == "fc" and report["k"] == 0.5
        assert report["params_total"] == artifact.masked_weights == 266_200
        assert report["params_kept"] == artifact.kept_weights
        assert report["macs_dense"] == FC_MACS_28
        assert report["macs_effective"] == round(FC_MACS_28 * artifact.kept_weights / artifact.masked_weights)
        assert report["artifact_bytes"] == artifact.file_bytes
    assert compact["onnx_compact_bytes"] == (run / "model.onnx").stat().st_size
    assert dense["onnx_dense_bytes"] == (run / "model.dense.onnx").stat().st_size


def test_onnx_without_metadata_needs_preprocessing(run, tmp_path):
    proto = onnx.load(str(run / "model.dense.onnx"))
    del proto.metadata_props[:]
    bare = tmp_path / "bare.onnx"
    onnx.save(proto, str(bare))
    with pytest.raises(MaskforgeError, match="no maskforge metadata.*--mean, --std, --size"):
        evaluate(bare, latency=False)
    spec = load_artifact(run / "artifact.safetensors").spec
    report = evaluate(bare, mean=",".join(map(str, spec.mean)), std=list(spec.std), size=28, latency=False)
    _, top1, _ = _independent_accuracy(run / "artifact.safetensors")
    assert report["correct"] == top1
    # parameters are counted from the dense initializers themselves
    assert report["params_total"] == 266_200 and report["params_kept"] == 133_100
    assert report["macs_dense"] == FC_MACS_28


def test_cli_report_table_and_json(run, tmp_path):
    out = tmp_path / "report.json"
    result = CliRunner().invoke(app, ["eval", str(run / "artifact.safetensors"), "--batch-size", "32",
                                      "--threads", "1", "--latency-runs", "4", "--json", str(out)])
    assert result.exit_code == 0, result.stderr
    report = json.loads(out.read_text())
    for key in ("top1", "top5", "examples", "latency_ms", "images_per_s", "onnx_bytes", "params_total",
                "params_kept", "macs_dense", "macs_effective", "torch_latency_ms", "ort_vs_torch",
                "onnx_compact_bytes", "onnx_dense_bytes", "dense_float32_bytes", "artifact_bytes"):
        assert report.get(key) is not None, key
    assert set(report["latency_ms"]) == {"1", "32"} and set(report["images_per_s"]) == {"1", "32"}
    for stats in list(report["latency_ms"].values()) + list(report["torch_latency_ms"].values()):
        assert 0 < stats["p50"] <= stats["p90"] <= stats["p99"] and stats["runs"] >= 3
    assert report["images_per_s"]["32"] == pytest.approx(32_000 / report["latency_ms"]["32"]["p50"])
    assert report["ort_vs_torch"]["32"] == pytest.approx(report["images_per_s"]["32"]
                                                         / report["torch_images_per_s"]["32"])
    assert report["onnx_compact_bytes"] < report["onnx_dense_bytes"]
    assert report["dense_float32_bytes"] == 4 * 266_200  # the MLP has no batch norm
    text = " ".join(result.stdout.split())
    assert "top-1 (onnxruntime)" in text and "does not speed up dense kernels" in text


def _folder(root: Path, classes: list[str], mode: str, size: int = 28) -> Path:
    for split in ("train", "val"):
        for name in classes:
            (root / split / name).mkdir(parents=True, exist_ok=True)
            pixels = np.zeros((size, size, 3) if mode == "RGB" else (size, size), dtype=np.uint8)
            Image.fromarray(pixels, mode).save(root / split / name / "0.png")
    return root


@pytest.mark.parametrize("case", ["truncated onnx", "not onnx", "no metadata", "rgb images", "other class names",
                                  "json under a file"])
def test_cli_bad_input_is_one_line_exit_2_and_leaves_nothing(run, tmp_path, case):
    model, extra = run / "model.onnx", []
    if case == "truncated onnx":
        model = tmp_path / "cut.onnx"
        data = (run / "model.onnx").read_bytes()
        model.write_bytes(data[: len(data) * 2 // 3])
    elif case == "not onnx":
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
    else:
        (tmp_path / "plain").write_text("x")
        extra = ["--json", str(tmp_path / "plain" / "r.json")]
    before = sorted(p.name for p in tmp_path.rglob("*"))
    result = CliRunner().invoke(app, ["eval", str(model), "--latency-runs", "1", *extra])
    assert result.exit_code == 2, (result.stdout, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.stderr
    expected = {"truncated onnx": "not a readable ONNX model|not a valid ONNX model",
                "not onnx": "not a readable ONNX model", "no metadata": "pass --std, --size",
                "rgb images": "3-channel images, the model takes 1",
                "other class names": "has classes a, b", "json under a file": "cannot write"}[case]
    assert re.search(expected, lines[0]), lines[0]
    assert sorted(p.name for p in tmp_path.rglob("*")) == before

"""The rest of the command line for converted models (issue 15, item 4): `inspect`, `predict`,
`eval --compare` and `sweep` on a user's builder and a torchvision builder, end to end through the CLI.

Oracles: predict's classes against the artifact's own masked model run by torch on the same decoded
pixels; eval --compare's fp32 columns against the float32 network (100 % agreement); the sweep's points
against separate searches of the same configurations (identical held-out accuracy).
"""

from __future__ import annotations

import csv
import json
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from maskforge.artifact import load_artifact
from maskforge.cli import app
from maskforge.data import load_data
from maskforge.runfiles import RESULTS_FILE
from maskforge.schema import SearchConfig
from maskforge.searches import search

NET = textwrap.dedent("""
    import torch.nn as nn

    def build(in_channels, num_classes, width=8):
        return nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.GroupNorm(2, width), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, width, 3, padding=1, groups=width), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Flatten(), nn.Linear(width * 14 * 14, num_classes))
""")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A user builder searched for 40 steps on the demo data, with its code trusted for the module."""
    root = tmp_path_factory.mktemp("convert_cli")
    (root / "tinynet.py").write_text(NET)
    patch = pytest.MonkeyPatch()
    patch.chdir(root)
    patch.setenv("MASKFORGE_TRUST_CODE", "tinynet.py:build")
    result = search(SearchConfig(arch="tinynet.py:build", k=0.5, max_steps=40, epochs=5, out=str(root / "run")))
    heldout = load_data("mnist5k").heldout
    for row in range(4):
        Image.fromarray(heldout.images[row, 0].numpy(), "L").save(root / f"digit{row}.png")
    yield root, result
    patch.undo()


def _cli(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": None})


def test_inspect_names_the_user_code_the_artifact_depends_on(run):
    root, result = run
    shown = _cli("inspect", result.artifact_path)
    assert shown.exit_code == 0, shown.stderr
    text = " ".join(shown.stdout.split())
    assert "tinynet.py:build" in text and "depends on" in text and "user code tinynet.py" in text


def test_predict_gives_the_classes_of_the_searched_network(run):
    root, result = run
    images = [root / f"digit{row}.png" for row in range(4)]
    shown = _cli("predict", result.artifact_path, *images, "--json")
    assert shown.exit_code == 0, shown.stderr
    predicted = [p["top"][0]["index"] for p in json.loads(shown.stdout)["predictions"]]
    artifact = load_artifact(result.artifact_path)
    pixels = np.stack([np.asarray(Image.open(image), np.float32) / 255 for image in images])[:, None]
    x = (pixels - artifact.spec.mean[0]) / artifact.spec.std[0]
    with torch.no_grad():
        expected = artifact.create_model()(torch.from_numpy(x.astype(np.float32))).argmax(1).tolist()
    assert predicted == expected


def test_eval_compare_exports_every_mode(run):
    _, result = run
    shown = _cli("eval", result.artifact_path, "--compare", "--no-latency", "--threads", "1")
    assert shown.exit_code == 0, shown.stderr
    agreement = next(line for line in shown.stdout.splitlines() if "agreement with float32" in line)
    cells = [cell.strip() for cell in agreement.split("│")[2:-1]]
    assert len(cells) == 6 and cells[:3] == ["100.00%"] * 3, agreement  # fp32: the float32 network


@pytest.mark.slow
def test_a_sweep_of_a_torchvision_builder_gives_what_single_searches_give(tmp_path):
    common = ["--arch", "torchvision:mobilenet_v3_small", "--max-steps", "3", "--epochs", "1", "--device", "cpu"]
    shown = _cli("sweep", "--out", tmp_path / "sweep", "--k", "0.3,0.5", *common, "--no-figure", "-q")
    assert shown.exit_code == 0, shown.stderr
    with open(tmp_path / "sweep" / RESULTS_FILE, newline="") as table:
        swept = {float(row["k"]): float(row["heldout_acc"]) for row in csv.DictReader(table) if row["status"] == "done"}
    single = {
        k: search(
            SearchConfig(
                arch="torchvision:mobilenet_v3_small",
                k=k,
                max_steps=3,
                epochs=1,
                device="cpu",
                out=str(tmp_path / f"k{k}"),
            )
        ).heldout_acc
        for k in (0.3, 0.5)
    }
    assert swept == single

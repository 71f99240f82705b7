"""`maskforge predict`: top-k classes and probabilities of image files, from an artifact (PyTorch) or an ONNX
export (onnxruntime), checked against an independent computation: the search-time masked model on images
decoded by PIL and torchvision's Resize + CenterCrop, normalized with numpy, softmax by torch, ranks by
numpy's argsort."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from typer.testing import CliRunner

from eval_helpers import searched_fc
from maskforge.artifact import load_artifact
from maskforge.cli import app
from maskforge.data import load_data
from maskforge.errors import MaskforgeError
from maskforge.prediction import predict

PICKED = [0, 1, 2, 3, 10, 999]  # held-out rows


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("predict")
    searched_fc(out, steps=10)
    heldout = load_data("mnist5k").heldout
    for row in PICKED:
        Image.fromarray(heldout.images[row, 0].numpy(), "L").save(out / f"heldout{row}.png")
    # the same digit at another size and aspect: decoded as an image folder's images are
    Image.fromarray(heldout.images[0, 0].numpy(), "L").resize((47, 61), Image.NEAREST).save(out / "big.png")
    return out


def _oracle(run: Path, pixels: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities, class ranks) of uint8 28x28 images from the search-time model."""
    artifact = load_artifact(run / "artifact.safetensors")
    x = np.stack(pixels)[:, None].astype(np.float32) / np.float32(255)
    x = (x - np.float32(artifact.spec.mean[0])) / np.float32(artifact.spec.std[0])
    with torch.no_grad():
        logits = artifact.create_model()(torch.from_numpy(x))
    return torch.softmax(logits.double(), dim=1).numpy(), np.argsort(-logits.numpy(), axis=1)


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(TF.center_crop(TF.resize(image.convert("L"), 28), 28), dtype=np.uint8)


@pytest.mark.parametrize("model", ["artifact.safetensors", "model.onnx"])
def test_top5_and_probabilities_match_an_independent_computation(run, model):
    files = [run / f"heldout{row}.png" for row in PICKED] + [run / "big.png"]
    predictions = predict(run / model, files, threads=1)
    probabilities, ranks = _oracle(run, [_pixels(f) for f in files])
    heldout = load_data("mnist5k").heldout
    assert np.array_equal(_pixels(run / "heldout0.png"), heldout.images[0, 0].numpy())  # PNG is lossless
    assert [p.image for p in predictions] == [str(f) for f in files]
    for index, prediction in enumerate(predictions):
        assert [c.index for c in prediction.top] == ranks[index, :5].tolist()
        assert [c.name for c in prediction.top] == [str(c) for c in ranks[index, :5]]
        assert [c.rank for c in prediction.top] == [1, 2, 3, 4, 5]
        assert [c.probability for c in prediction.top] == pytest.approx(
            probabilities[index, ranks[index, :5]], abs=1e-6
        )


def test_cli_json_top_is_capped_at_the_class_count(run):
    result = CliRunner().invoke(
        app, ["predict", str(run / "model.onnx"), str(run / "heldout3.png"), "--top", "50", "--json"]
    )
    assert result.exit_code == 0, result.stderr
    document = json.loads(result.stdout)
    top = document["predictions"][0]["top"]
    assert len(top) == 10 and sorted(c["index"] for c in top) == list(range(10))
    assert sum(c["probability"] for c in top) == pytest.approx(1.0, abs=1e-9)  # the whole distribution
    assert [c["probability"] for c in top] == sorted((c["probability"] for c in top), reverse=True)
    table = CliRunner().invoke(app, ["predict", str(run / "artifact.safetensors"), str(run / "heldout3.png")])
    assert table.exit_code == 0 and f"{top[0]['probability']:.2%}" in table.stdout


@pytest.mark.parametrize("case", ["missing image", "a folder", "corrupt image", "top 0"])
def test_bad_input_is_one_line_exit_2(run, tmp_path, case):
    image, extra = str(run / "heldout0.png"), []
    if case == "missing image":
        image = str(tmp_path / "nope.png")
    elif case == "a folder":
        image = str(tmp_path)
    elif case == "corrupt image":
        (tmp_path / "cut.png").write_bytes((run / "heldout0.png").read_bytes()[:50])
        image = str(tmp_path / "cut.png")
    else:
        extra = ["--top", "0"]
    result = CliRunner().invoke(app, ["predict", str(run / "model.onnx"), image, *extra])
    expected = {
        "missing image": r"image .*nope.png does not exist",
        "a folder": r"folder .* contains no images",
        "corrupt image": r"cannot decode image .*cut.png",
        "top 0": "top must be a positive integer",
    }[case]
    lines = result.stderr.splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert re.search(expected, lines[0]), lines[0]


def test_library_refuses_an_empty_list(run):
    with pytest.raises(MaskforgeError, match="no images given"):
        predict(run / "model.onnx", [])

"""Any model, end to end (slow: a few hundred CPU search steps each): issue 15's zoo members and a user
module are searched, learn (held-out clearly above the 10 % of chance), export in the default storage
with parity against PyTorch, export to int8 with exact weights and >= 98 % argmax agreement, and verify.

The 28x28 members run on the demo set; the members whose strides need 32x32 inputs run on the demo
digits written as a 32x32 image folder (held out as the demo set holds out: every fifth image).
"""

from __future__ import annotations

import json
import textwrap

import numpy as np
import pytest
from PIL import Image

from helpers import demo_rows
from maskforge import convert
from maskforge.errors import MaskforgeError
from maskforge.export import export_onnx
from maskforge.schema import SearchConfig
from maskforge.searches import resume, search
from maskforge.verify import verify_artifact, verify_onnx

pytestmark = pytest.mark.slow

VIT = {"image_size": 28, "patch_size": 4, "num_layers": 2, "num_heads": 4, "hidden_dim": 64, "mlp_dim": 128}

USER = textwrap.dedent("""
    import torch.nn as nn

    def build(in_channels, num_classes, width=32):
        return nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1, groups=width), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 1), nn.GroupNorm(4, 2 * width), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.LayerNorm(2 * width * 49), nn.Dropout(0.1), nn.Linear(2 * width * 49, num_classes))
""")


def _digits_folder(root, count=2000, side=32):
    """The first `count` demo images as PNG files in an image folder (train/ and val/, a folder per digit)."""
    train_x, train_y, test_x, test_y = demo_rows()
    for split, x, y in (
        ("train", train_x[:count], train_y[:count]),
        ("val", test_x[: count // 4], test_y[: count // 4]),
    ):
        for i, (image, label) in enumerate(zip(x, y)):
            folder = root / split / str(int(label))
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.asarray(image, np.uint8).reshape(28, 28)).convert("RGB").resize((side, side)).save(
                folder / f"{i}.png"
            )
    return root


def _search_and_ship(tmp_path, config: SearchConfig, min_acc: float):
    result = search(config)
    assert result.heldout_acc >= min_acc, result.metrics[-1]
    artifact = result.artifact_path
    assert verify_artifact(artifact).ok
    fp32 = export_onnx(artifact, tmp_path / "model.onnx")  # regen: parity checked against PyTorch
    assert fp32.storage == "regen" and fp32.max_abs_diff <= fp32.parity_tolerance
    assert verify_onnx(fp32.path, artifact).ok
    int8 = export_onnx(artifact, tmp_path / "model.int8.onnx", precision="int8")
    assert int8.int8_weight_max_error == 0.0 and int8.kernel_max_steps <= 1
    assert int8.argmax_agreement >= 0.98, (int8.argmax_agreement, int8.top1, int8.reference_top1)
    assert verify_onnx(int8.path, artifact).ok
    return result


@pytest.mark.parametrize(
    "arch,builder_args,steps,min_acc",
    [
        ("torchvision:mobilenet_v3_small", None, 200, 0.6),
        ("torchvision:VisionTransformer", VIT, 600, 0.4),
    ],
)
def test_zoo_members_on_the_demo_set(tmp_path, arch, builder_args, steps, min_acc):
    config = SearchConfig(
        arch=arch,
        arch_args=json.dumps(builder_args) if builder_args else None,
        k=0.5,
        max_steps=steps,
        epochs=100,
        device="cpu",
        out=str(tmp_path / "run"),
    )
    _search_and_ship(tmp_path, config, min_acc)


# Each member searched until it is confident enough for int8 to keep its classes: 150 steps left
# EfficientNet-B0 at 73 % held-out with int8 agreement 89 % (600: 97 % and 99.4 %), RegNet-X-400MF at
# 60 % and 80 % (600: 91 % and 95 %, refused for 1.6 points of top-1; 1500: 95.2 % and 99.4 %).
@pytest.mark.parametrize(
    "arch,steps,batch",
    [
        ("torchvision:efficientnet_b0", 600, 64),
        ("torchvision:densenet121", 150, 64),
        ("torchvision:regnet_x_400mf", 1500, 64),
        ("torchvision:convnext_tiny", 150, 32),
    ],
)
def test_zoo_members_on_32_pixel_digits(tmp_path, arch, steps, batch):
    data = _digits_folder(tmp_path / "digits")
    config = SearchConfig(
        arch=arch,
        data=str(data),
        k=0.5,
        max_steps=steps,
        epochs=100,
        batch_size=batch,
        lr=0.05,
        device="cpu",
        out=str(tmp_path / "run"),
    )
    _search_and_ship(tmp_path, config, 0.3)


def test_user_module_searches_resumes_ships_and_refuses_an_edit(tmp_path, monkeypatch):
    from maskforge.artifact import load_artifact

    monkeypatch.chdir(tmp_path)
    (tmp_path / "mynet.py").write_text(USER)
    out = tmp_path / "run"
    config = SearchConfig(
        arch="mynet.py:build",
        arch_args='{"width": 16}',
        k=0.5,
        epochs=10,
        device="cpu",
        out=str(out),
        keep_checkpoint=True,
    )
    result = _search_and_ship(tmp_path, config, 0.6)
    # a finished search extended by resume: the same builder, rebuilt from config.json and the checkpoint
    extended = resume(out, {"epochs": 11})
    assert [record["step"] for record in extended.metrics][-2:] == [320, 352]
    artifact = load_artifact(result.artifact_path)
    assert artifact.meta.arch.library == "user code mynet.py"
    (tmp_path / "mynet.py").write_text(USER.replace("nn.Conv2d(width, 2 * width, 1)", "nn.Conv2d(width, 2 * width, 3)"))
    convert._file_modules.clear()
    with pytest.raises(
        MaskforgeError,
        match=r"no longer builds the searched network \(entry \d+: recorded "
        r"'7\.weight param 32x16x1x1 Conv2d', the code now gives "
        r"'7\.weight param 32x16x3x3 Conv2d'\)",
    ):
        load_artifact(result.artifact_path)

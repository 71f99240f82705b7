"""Small builders shared by several test files (pytest puts this folder on sys.path)."""

from __future__ import annotations

import contextlib
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from PIL import Image

import maskforge
from maskforge import archs
from maskforge.layers import batchnorm_modules, masked_modules


def write_image_folder(root: Path, train_per_class: int, val_per_class: int = 8) -> Path:
    """An RGB image folder with two easily separated classes ("dark", "light") of 8x8 PNGs."""
    rng = np.random.default_rng(0)
    for split, count in (("train", train_per_class), ("val", val_per_class)):
        for label, name in enumerate(("dark", "light")):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = np.clip(rng.normal(60 + 120 * label, 40, (8, 8, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


def perturb_like_search(
    model: nn.Module, seed: int, *, score_noise: float, bn_mean_scale: float, bn_var_floor: float
) -> nn.Module:
    """Make a freshly created model look searched: scores moved off their start, BN statistics set."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in masked_modules(model).values():
            layer.scores.add_(torch.randn(layer.scores.shape, generator=gen) * score_noise)
        for bn in batchnorm_modules(model).values():
            bn.running_mean.copy_(torch.randn(bn.num_features, generator=gen) * bn_mean_scale)
            bn.running_var.copy_(torch.rand(bn.num_features, generator=gen) + bn_var_floor)
    return model


VENDORED = Path(maskforge.__file__).parent / "_data" / "mnist5k.npz"


def demo_rows() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The demo set's documented split, read from the vendored file independently of maskforge.data:
    row i is held out iff i % 5 == 4. Returns (train images, train labels, held-out images, labels)."""
    with np.load(VENDORED, allow_pickle=False) as npz:
        images, labels = npz["images"], npz["labels"]
    held = np.arange(len(labels)) % 5 == 4
    return images[~held], labels[~held], images[held], labels[held]


def write_mnist_folder(root: Path, train: int, heldout: int) -> Path:
    """An MNIST raw folder (IDX files, torchvision's layout) holding the first `train` training and the
    first `heldout` held-out images of the demo set: a smaller demo set, through a public data format."""
    train_x, train_y, test_x, test_y = demo_rows()
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for prefix, x, y in (("train", train_x[:train], train_y[:train]), ("t10k", test_x[:heldout], test_y[:heldout])):
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(
            bytes([0, 0, 8, 3]) + struct.pack(">3I", *x.shape) + x.astype(np.uint8).tobytes()
        )
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(
            bytes([0, 0, 8, 1]) + struct.pack(">I", len(y)) + y.astype(np.uint8).tobytes()
        )
    return root


@dataclass
class Spy:
    """What a spied architecture saw: every model built, the state at its first training forward (before
    any optimizer step), and every input it trained on."""

    name: str
    models: list = field(default_factory=list)
    first_state: dict = field(default_factory=dict)
    trained: list = field(default_factory=list)


@contextlib.contextmanager
def spy_arch(base: str):
    """Register `_spy_<base>`: architecture `base`, recording what the search does with it."""
    spy = Spy(f"_spy_{base}")

    def record(module, args):
        if module.training:
            if not spy.first_state:  # parameters (the scores) and buffers (weights, BN statistics)
                named = [*module.named_parameters(), *module.named_buffers()]
                spy.first_state.update({name: tensor.detach().clone() for name, tensor in named})
            spy.trained.append(args[0].detach().clone())

    def build(*args, **kwargs):
        model = archs.ARCHS[base].builder(*args, **kwargs)
        model.register_forward_pre_hook(record)
        spy.models.append(model)
        return model

    archs.register_arch(spy.name, f"test-only: {base}, recording what it trains on")(build)
    try:
        yield spy
    finally:
        archs.ARCHS.pop(spy.name, None)


# --- shared oracles ------------------------------------------------------------------------------------


def one_error_line(result, pattern: str | None = None, *, stdout_empty: bool = False) -> str:
    """The CLI's error contract (DESIGN.md): exit code 2, no traceback, exactly one stderr line starting
    `error: ` (matching the regular expression `pattern`, searched), and with `stdout_empty` nothing on
    stdout. Returns the line."""
    import re

    assert result.exit_code == 2, (result.exit_code, result.stdout, result.stderr, result.exception)
    assert "Traceback" not in result.output, result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    if stdout_empty:
        assert result.stdout == "", result.stdout
    if pattern is not None:
        assert re.search(pattern, lines[0]), lines[0]
    return lines[0]


def without_timings(metrics: list[dict]) -> list[dict]:
    """Epoch records without their wall-clock fields, the part that a deterministic search repeats."""
    from maskforge.searches import TIMING_FIELDS

    return [{k: v for k, v in record.items() if k not in TIMING_FIELDS} for record in metrics]

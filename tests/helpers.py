"""Small builders shared by several test files (pytest puts this folder on sys.path)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from PIL import Image

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


def perturb_like_search(model: nn.Module, seed: int, *, score_noise: float, bn_mean_scale: float,
                        bn_var_floor: float) -> nn.Module:
    """Make a freshly created model look searched: scores moved off their start, BN statistics set."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in masked_modules(model).values():
            layer.scores.add_(torch.randn(layer.scores.shape, generator=gen) * score_noise)
        for bn in batchnorm_modules(model).values():
            bn.running_mean.copy_(torch.randn(bn.num_features, generator=gen) * bn_mean_scale)
            bn.running_var.copy_(torch.rand(bn.num_features, generator=gen) + bn_var_floor)
    return model

"""Batch transforms on any device: normalization and the crop + flip augmentation.

They are ours rather than `torchvision.transforms.v2`: `normalize` must compute exactly what an exported
model's input spec documents, and `augment_batch` draws a different crop and flip for every image of a
batch from an explicit generator (v2 transforms draw one set of parameters per call from the global
RNG), which is what makes a resumed search augment exactly as the uninterrupted one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..schema import InputSpec


def normalize(x_uint8: torch.Tensor, spec: InputSpec, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """`(x / 255 - mean) / std` per channel, for `[C, H, W]` or `[B, C, H, W]` on any device.

    Low-precision dtypes (float16/bfloat16) are computed in float32 and rounded once at the end.
    """
    if x_uint8.dim() < 3 or x_uint8.shape[-3] != spec.channels:
        raise ValueError(f"expected [..., {spec.channels}, H, W] images, got shape {tuple(x_uint8.shape)}")
    compute = torch.promote_types(dtype, torch.float32)
    mean = torch.tensor(spec.mean, dtype=compute, device=x_uint8.device).view(-1, 1, 1)
    std = torch.tensor(spec.std, dtype=compute, device=x_uint8.device).view(-1, 1, 1)
    return ((x_uint8.to(compute) / 255 - mean) / std).to(dtype)


def augment_batch(x_uint8: torch.Tensor, generator: torch.Generator, padding: int = 4) -> torch.Tensor:
    """Random crop (zero-pad by `padding`, crop back to H x W) and random horizontal flip, per image.

    The random draws (vertical offsets, horizontal offsets, flips, in that order) come from `generator`
    on its own device (normally the CPU) and are then applied on `x`'s device in one gather, so the same
    generator state gives the same output on any device.
    """
    if x_uint8.dim() != 4:
        raise ValueError(f"expected a batch [B, C, H, W], got shape {tuple(x_uint8.shape)}")
    if padding < 0:
        raise ValueError(f"padding must be >= 0, got {padding}")
    b, c, h, w = x_uint8.shape
    device = x_uint8.device
    gen_device = generator.device
    top = torch.randint(0, 2 * padding + 1, (b,), generator=generator, device=gen_device).to(device)
    left = torch.randint(0, 2 * padding + 1, (b,), generator=generator, device=gen_device).to(device)
    flip = (torch.randint(0, 2, (b,), generator=generator, device=gen_device) == 1).to(device)

    padded = F.pad(x_uint8, (padding, padding, padding, padding))
    rows = top[:, None] + torch.arange(h, device=device)  # [B, H] rows of the padded image
    cols = left[:, None] + torch.arange(w, device=device)  # [B, W]
    cols = torch.where(flip[:, None], cols.flip(1), cols)  # a flip reads the window's columns backwards
    return padded[
        torch.arange(b, device=device)[:, None, None, None],
        torch.arange(c, device=device)[None, :, None, None],
        rows[:, None, :, None],
        cols[:, None, None, :],
    ]

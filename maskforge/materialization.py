"""Artifact -> a plain PyTorch network with the masked weights baked in.

`materialize` regenerates every weight from the seed (in parallel threads), checks each tensor against
the SHA-256 recorded at search time (hashing releases the GIL, so the checks run in parallel too), and
builds the architecture with ordinary `nn.Conv2d` / `nn.Linear` layers holding `weight * mask` and the
batch-norm running statistics. The result depends on nothing of maskforge at inference time.

>>> model = materialize("runs/demo/artifact.safetensors")      # doctest: +SKIP
>>> logits = model(torch.zeros(1, 1, 28, 28))                  # doctest: +SKIP
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from . import archs, convert
from .artifact import Artifact, check_weight_digests, load_artifact, regenerate_weights
from .layers import batchnorm_modules


def as_artifact(artifact_or_path: Artifact | str | os.PathLike) -> Artifact:
    """Accept an `Artifact` or the path of one."""
    if isinstance(artifact_or_path, Artifact):
        return artifact_or_path
    return load_artifact(Path(artifact_or_path))


def masked_weights(
    artifact: Artifact | str | os.PathLike, *, threads: int | None = None, verify: bool = True
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """`{param name: (regenerated float32 weight, bool mask)}` for every masked layer, in module order.

    Each layer is regenerated and (with `verify`) hashed in a worker thread. A digest mismatch raises
    `MaskforgeError` naming the first failing layer in module order.
    """
    artifact = as_artifact(artifact_or_path=artifact)
    generated = regenerate_weights(artifact, digests=verify, threads=threads)
    if verify:
        check_weight_digests(artifact, {param: digest for param, (_, digest) in generated.items()})
    return {param: (weight, artifact.masks[param].numpy()) for param, (weight, _) in generated.items()}


def plain_structure(arch: str, arch_args: dict, k: float) -> nn.Module:
    """The architecture with plain bias-free layers in place of the masked ones, on the meta device."""
    with torch.device("meta"):
        return convert.plain_layers(archs.build_structure(arch, arch_args, k))


def materialize(artifact_or_path: Artifact | str | os.PathLike, *, threads: int | None = None) -> nn.Module:
    """A plain `nn.Module` in eval mode whose outputs equal the artifact's masked search-time model.

    Weights are regenerated and checked against the artifact's digests first; a mismatch raises
    `MaskforgeError` naming the layer.

    >>> model = materialize("runs/demo/artifact.safetensors")      # doctest: +SKIP
    >>> isinstance(model.features[0], torch.nn.Conv2d)             # doctest: +SKIP
    True
    """
    artifact = as_artifact(artifact_or_path)
    weights = masked_weights(artifact, threads=threads)
    model = plain_structure(artifact.arch, artifact.arch_args, artifact.k)
    model.to_empty(device="cpu")
    convert.fill_fixed(model, artifact.seed)
    with torch.no_grad():
        modules = dict(model.named_modules())
        for param, (weight, mask) in weights.items():
            # weight * mask with the masked entries set to +0.0 (a product would give -0.0 for negatives)
            baked = np.where(mask, weight, np.float32(0.0)).astype(np.float32, copy=False)
            modules[param.rsplit(".", 1)[0]].weight.copy_(torch.from_numpy(baked))
        for name, bn in batchnorm_modules(model).items():
            bn.running_mean.copy_(artifact.bn_stats[f"{name}.running_mean"])
            bn.running_var.copy_(artifact.bn_stats[f"{name}.running_var"])
            if bn.num_batches_tracked is not None:
                bn.num_batches_tracked.zero_()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model.eval()

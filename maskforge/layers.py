"""Masked layers: fixed random weights, trainable scores, and the per-layer top-k straight-through mask.

The forward pass uses `weight * h(|scores|)` where h keeps the top `kept` scores of the layer. The
weights are non-persistent buffers (regenerated from the seed, never trained, never checkpointed); the
scores are the only parameters. Backward treats h as the identity (straight-through estimator), so the
score gradient is `grad_effective_weight * weight * sign(scores)`, as in the paper's reference code.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def kept_count(numel: int, k: float) -> int:
    """How many weights a layer keeps: round(k * n) (half to even, Python's round), at least 1."""
    return max(1, min(numel, round(k * numel)))


def topk_mask(magnitudes: torch.Tensor, kept: int) -> torch.Tensor:
    """Boolean mask of the `kept` largest entries of `magnitudes` (any shape), exactly as a full sort.

    Tie rule: among entries equal to the threshold, those with the lowest flat (C-order) index win —
    the order a stable descending sort would give. Cost: one selection (`kthvalue`, linear time) and a
    comparison; the tie pass runs only when ties straddle the threshold.
    """
    flat = magnitudes.reshape(-1)
    numel = flat.numel()
    if kept >= numel:
        return torch.ones_like(magnitudes, dtype=torch.bool)
    # The kept-th largest value is the (numel - kept + 1)-th smallest.
    threshold = torch.kthvalue(flat, numel - kept + 1).values
    above = flat > threshold
    at = flat == threshold
    if flat.is_cuda:
        # No host sync on the GPU: always resolve ties with a prefix count over the threshold entries.
        room = kept - above.sum()
        mask = above | (at & (torch.cumsum(at, 0) <= room))
    else:
        mask = above | at
        excess = int(mask.sum()) - kept
        if excess > 0:
            tied = torch.nonzero(at).squeeze(1)
            mask[tied[-excess:]] = False
    return mask.view_as(magnitudes)


class _StraightThroughMask(torch.autograd.Function):
    """w * topk(|s|) forward; d/ds = grad * w * sign(s) backward (h treated as identity)."""

    @staticmethod
    def forward(ctx, scores: torch.Tensor, weight: torch.Tensor, kept: int) -> torch.Tensor:
        ctx.save_for_backward(scores, weight)
        return weight * topk_mask(scores.detach().abs(), kept)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        scores, weight = ctx.saved_tensors
        return grad * (weight * torch.sign(scores)), None, None


class _MaskedMixin:
    """Shared by masked conv and linear: holds the frozen weight buffer, the scores and k."""

    weight: torch.Tensor
    scores: nn.Parameter

    def _init_masking(self, k: float) -> None:
        shape = self.weight.shape
        device = self.weight.device
        # The weight leaves the parameter list: it is regenerated from the seed, never trained or saved.
        del self.weight
        self.register_buffer("weight", torch.zeros(shape, device=device), persistent=False)
        self.scores = nn.Parameter(torch.zeros(shape, device=device))
        self.k = float(k)
        self._mask_cache: tuple[int, torch.Tensor] | None = None

    @property
    def kept(self) -> int:
        return kept_count(self.weight.numel(), self.k)

    def mask(self) -> torch.Tensor:
        """The current boolean mask (cached until the scores change)."""
        version = self.scores._version
        if self._mask_cache is None or self._mask_cache[0] != version or self._mask_cache[1].device != self.scores.device:
            self._mask_cache = (version, topk_mask(self.scores.detach().abs(), self.kept))
        return self._mask_cache[1]

    def effective_weight(self) -> torch.Tensor:
        if torch.is_grad_enabled() and self.scores.requires_grad:
            return _StraightThroughMask.apply(self.scores, self.weight, self.kept)
        return self.weight * self.mask()

    def extra_repr(self) -> str:  # noqa: D401 - nn.Module hook
        return f"{super().extra_repr()}, k={self.k}"


class MaskedConv2d(_MaskedMixin, nn.Conv2d):
    """A bias-free Conv2d whose weight is fixed and masked by the top-k of its scores."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0,
                 dilation=1, groups: int = 1, *, k: float = 0.5, device=None) -> None:
        nn.Conv2d.__init__(self, in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                           dilation=dilation, groups=groups, bias=False, device=device)
        self._init_masking(k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.effective_weight(), None)


class MaskedLinear(_MaskedMixin, nn.Linear):
    """A bias-free Linear whose weight is fixed and masked by the top-k of its scores."""

    def __init__(self, in_features: int, out_features: int, *, k: float = 0.5, device=None) -> None:
        nn.Linear.__init__(self, in_features, out_features, bias=False, device=device)
        self._init_masking(k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.effective_weight())


MASKED_TYPES = (MaskedConv2d, MaskedLinear)


def NonAffineBatchNorm2d(num_features: int, device=None) -> nn.BatchNorm2d:
    """Batch norm without learned scale/bias (the paper's choice) that keeps running statistics."""
    return nn.BatchNorm2d(num_features, affine=False, track_running_stats=True, device=device)


def masked_modules(model: nn.Module) -> dict[str, _MaskedMixin]:
    """name -> masked layer, in module order."""
    return {name: module for name, module in model.named_modules() if isinstance(module, MASKED_TYPES)}


def batchnorm_modules(model: nn.Module) -> dict[str, nn.modules.batchnorm._BatchNorm]:
    return {name: module for name, module in model.named_modules()
            if isinstance(module, nn.modules.batchnorm._BatchNorm)}

"""Masked layers: fixed random weights, trainable scores, and the per-layer top-k straight-through mask.

The forward pass uses `weight * h(|scores|)` where h keeps the top `kept` scores of the layer. The
weights are non-persistent buffers (regenerated from the seed, never trained, never checkpointed); the
scores are the only parameters. Backward treats h as the identity (straight-through estimator), so the
score gradient is `grad_effective_weight * weight * sign(scores)`, as in the paper's reference code.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


def kept_count(numel: int, k: float) -> int:
    """How many weights a layer keeps: round(k * n) (half to even, Python's round), at least 1."""
    return max(1, min(numel, round(k * numel)))


class ThresholdHint:
    """A layer's last top-k threshold, so the next selection only has to look inside a narrow band.

    Pure speed-up state: `topk_mask` verifies every hint and falls back to a full selection when the band
    misses, so the mask never depends on it. Scores move little per optimizer step, hence so does the
    threshold; the band's half-width follows the observed moves (4x the last one, decaying by half).
    """

    __slots__ = ("threshold", "width")

    def __init__(self) -> None:
        self.threshold: float | None = None
        self.width = 0.0

    def update(self, value: float, hit: bool) -> None:
        if not math.isfinite(value):
            self.threshold = None
            return
        moved = abs(value - self.threshold) if self.threshold is not None else abs(value) * 1e-3
        floor = abs(value) * 2.0 ** -20 + 1e-30
        self.width = max(4.0 * moved, (0.5 if hit else 2.0) * self.width, floor)
        self.threshold = value


def topk_mask(magnitudes: torch.Tensor, kept: int, hint: ThresholdHint | None = None) -> torch.Tensor:
    """Boolean mask of the `kept` largest entries of `magnitudes` (any shape), exactly as a full sort.

    Tie rule: among entries equal to the threshold, those with the lowest flat (C-order) index win —
    the order a stable descending sort by (-value, index) would give. NaN counts as the largest value,
    as in `torch.sort`.

    CPU: NumPy introselect (`np.partition`, linear time, no index array: several times faster than
    `torch.kthvalue` or `torch.topk`), then one comparison. With a `hint` (the layer's previous
    threshold) only the entries inside a narrow band around it are partitioned. CUDA (and under
    torch.compile): `torch.kthvalue` and a prefix count over the tied entries, without any host sync.
    """
    numel = magnitudes.numel()
    if kept >= numel:
        return torch.ones_like(magnitudes, dtype=torch.bool)
    if kept <= 0:
        return torch.zeros_like(magnitudes, dtype=torch.bool)
    flat = magnitudes.detach().reshape(-1)
    if flat.device.type != "cpu" or torch.compiler.is_compiling():
        # The kept-th largest value is the (numel - kept + 1)-th smallest. (Also what torch.compile
        # traces on the CPU: NumPy would break its graph.)
        threshold = torch.kthvalue(flat, numel - kept + 1).values
        above = flat > threshold
        at = flat == threshold
        room = kept - above.sum()
        return (above | (at & (torch.cumsum(at, 0) <= room))).view(magnitudes.shape)
    if flat.dtype not in _NUMPY_DTYPES:
        flat = flat.double()  # bfloat16, integers: float64 holds them exactly, so the order is kept
    mask = _select_top(flat.numpy(), kept, hint)
    return torch.from_numpy(mask).view(magnitudes.shape)


_NUMPY_DTYPES = (torch.float32, torch.float64, torch.float16)
_BAND_MIN_SIZE = 16384  # below this a full partition costs less than the band's extra passes


def _select_top(values: np.ndarray, kept: int, hint: ThresholdHint | None) -> np.ndarray:
    """The exact top-`kept` boolean mask of a flat array (see `topk_mask`)."""
    if np.isnan(values.max()):  # one cheap pass; a diverged search, never the hot path
        return _stable_sort_mask(values, kept)
    use_band = hint is not None and hint.threshold is not None and values.size >= _BAND_MIN_SIZE
    result = _band_select(values, kept, hint) if use_band else None
    if result is None:
        cut = values.size - kept
        threshold = np.partition(values, cut)[cut]
        mask = values >= threshold
        count = int(np.count_nonzero(mask))
    else:
        threshold, mask, count = result
    if count > kept:  # entries equal to the threshold straddle the cut: the lowest indices stay
        tied = np.flatnonzero(values == threshold)
        mask[tied[tied.size - (count - kept):]] = False
    if use_band or (hint is not None and values.size >= _BAND_MIN_SIZE):
        hint.update(float(threshold), result is not None)
    return mask


def _band_select(values: np.ndarray, kept: int, hint: ThresholdHint):
    """(threshold, values >= threshold, its count) if the threshold lies in the hint's band, else None."""
    dtype = values.dtype.type
    low, high = dtype(hint.threshold - hint.width), dtype(hint.threshold + hint.width)
    above = values > high
    n_above = int(np.count_nonzero(above))
    if n_above >= kept:
        return None
    in_band = values >= low
    np.logical_xor(in_band, above, out=in_band)  # low <= v <= high, as `above` is a subset of `values >= low`
    band = values[in_band]
    rank = kept - n_above  # the threshold is the rank-th largest entry of the band
    if rank > band.size:
        return None
    cut = band.size - rank
    band = np.partition(band, cut)
    threshold = band[cut]
    count = n_above + int(np.count_nonzero(band >= threshold))  # entries below `cut` may tie it too
    return threshold, values >= threshold, count


def _stable_sort_mask(values: np.ndarray, kept: int) -> np.ndarray:
    order = torch.sort(torch.from_numpy(values), descending=True, stable=True).indices[:kept]
    mask = np.zeros(values.size, dtype=bool)
    mask[order.numpy()] = True
    return mask


class _StraightThroughMask(torch.autograd.Function):
    """w * topk(|s|) forward; d/ds = grad * w * sign(s) backward (h treated as identity).

    On the CPU the product runs in NumPy (torch's float x bool multiply promotes types element by
    element and is about 3x slower); the backward multiplies in place into one fresh tensor.
    """

    @staticmethod
    def forward(ctx, scores: torch.Tensor, weight: torch.Tensor, kept: int,
                hint: ThresholdHint | None = None) -> torch.Tensor:
        ctx.save_for_backward(scores, weight)
        numel = scores.numel()
        if (scores.device.type == "cpu" and weight.device.type == "cpu" and 0 < kept < numel
                and scores.dtype in _NUMPY_DTYPES and weight.dtype in _NUMPY_DTYPES
                and not torch.compiler.is_compiling()):
            # the same selection as topk_mask(|s|), minus its per-call torch overhead (small layers)
            magnitudes = np.abs(scores.detach().numpy()).reshape(-1)
            mask = _select_top(magnitudes, kept, hint).reshape(tuple(scores.shape))
            return torch.from_numpy(np.multiply(weight.detach().numpy(), mask))
        return weight * topk_mask(scores.detach().abs(), kept, hint)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        scores, weight = ctx.saved_tensors
        # sign(s) * w * grad: the products by +-1 and 0 are exact, so the order changes no bit
        return torch.sign(scores).mul_(weight).mul_(grad), None, None, None


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
        self._threshold_hint = ThresholdHint()  # speeds up the next top-k; never changes a mask

    @property
    def kept(self) -> int:
        return kept_count(self.weight.numel(), self.k)

    def mask(self) -> torch.Tensor:
        """The current boolean mask (cached until the scores change)."""
        version = self.scores._version
        if self._mask_cache is None or self._mask_cache[0] != version or self._mask_cache[1].device != self.scores.device:
            self._mask_cache = (version, topk_mask(self.scores.detach().abs(), self.kept, self._threshold_hint))
        return self._mask_cache[1]

    def effective_weight(self) -> torch.Tensor:
        if torch.is_grad_enabled() and self.scores.requires_grad:
            return _StraightThroughMask.apply(self.scores, self.weight, self.kept, self._threshold_hint)
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

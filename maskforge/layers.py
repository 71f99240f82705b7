"""Masked layers: fixed random weights, trainable scores, and the top-k straight-through mask.

The forward pass uses `weight * h(|scores|)` where h keeps the top `kept` scores of the layer (the
paper's rule) or, after `set_topk(model, "global")`, the layer's share of one top-k over all masked
layers. The weights are non-persistent buffers (regenerated from the seed, never trained, never
checkpointed); the scores are the only parameters. Backward treats h as the identity (straight-through
estimator), so the score gradient is `grad_effective_weight * weight * sign(scores)`, as in the paper's
reference code. Which implementation selects the top k (the *masker*: "numpy" or "torch", both exact)
is a per-layer setting, `set_masker(model, name)`; the selection itself lives in `maskforge.topk`.
"""

from __future__ import annotations

import typing

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import MaskforgeError
from .topk import (
    MASKERS,
    NUMPY_DTYPES,
    TOPK_RULES,
    ThresholdHint,
    check_masker,
    global_topk_masks,
    kept_count,
    numpy_select,
    topk_mask,
)

__all__ = [
    "MASKERS",
    "TOPK_RULES",
    "GlobalTopK",
    "MaskedConv1d",
    "MaskedConv2d",
    "MaskedConv3d",
    "MaskedLinear",
    "MASKED_TYPES",
    "NonAffineBatchNorm2d",
    "ProjectedAttention",
    "layer_weight",
    "ThresholdHint",
    "batchnorm_modules",
    "get_topk",
    "kept_count",
    "masked_modules",
    "set_masker",
    "set_topk",
    "topk_mask",
]


class _StraightThroughMask(torch.autograd.Function):
    """w * mask forward; d/ds = grad * w * sign(s) backward (the top-k h treated as identity).

    The mask is selected outside (per layer or globally) and enters as a constant. With `numpy_product`
    the product runs in NumPy (torch's float x bool multiply promotes element by element and is about
    3x slower on the CPU); the values are the same bits either way (w * 1 = w, w * 0 = 0 with w's sign).
    """

    @staticmethod
    def forward(
        ctx, scores: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor, numpy_product: bool = False
    ) -> torch.Tensor:
        ctx.save_for_backward(scores, weight)
        return _masked_product(weight, mask, numpy_product)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        scores, weight = ctx.saved_tensors
        # sign(s) * w * grad: the products by +-1 and 0 are exact, so the order changes no bit
        return torch.sign(scores).mul_(weight).mul_(grad), None, None, None


def _masked_product(weight: torch.Tensor, mask: torch.Tensor, numpy_product: bool) -> torch.Tensor:
    if numpy_product:
        return torch.from_numpy(np.multiply(weight.detach().numpy(), mask.numpy()))
    return weight.detach() * mask


def _numpy_layer_mask(scores: torch.Tensor, kept: int, hint: ThresholdHint) -> torch.Tensor:
    """The numpy masker on a layer's scores, minus `topk_mask`'s per-call torch overhead (small layers)."""
    flat = scores.detach().reshape(-1)
    if flat.device.type == "cpu" and flat.dtype in NUMPY_DTYPES and 0 < kept < flat.numel():
        return torch.from_numpy(numpy_select(np.abs(flat.numpy()), kept, hint)).view(scores.shape)
    return topk_mask(scores.detach().abs(), kept, hint, masker="numpy")


# torch.compile cannot trace NumPy's partition: inside a compiled graph the numpy masker runs eagerly.
_numpy_layer_mask_eager = torch.compiler.disable(_numpy_layer_mask)


class _MaskedMixin:
    """Shared by masked conv and linear: holds the frozen weight buffer, the scores, k and the masker."""

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
        self.masker: str | None = None  # "numpy", "torch", or None: follow the device (see maskforge.topk)
        self.global_topk: GlobalTopK | None = None  # set by `set_topk(model, "global")`
        self._mask_cache: tuple[tuple[int, int], torch.Tensor] | None = None
        self._threshold_hint = ThresholdHint()  # speeds up the numpy masker; never changes a mask

    @property
    def kept(self) -> int:
        """Weights the per-layer rule keeps (under global top-k, count `mask()` instead)."""
        return kept_count(self.weight.numel(), self.k)

    def mask(self) -> torch.Tensor:
        """The current boolean mask, from the layer's own top-k or the model's global one; cached until
        the scores change (in place or by being replaced)."""
        if self.global_topk is not None:
            return self.global_topk.mask_of(self)
        if torch.compiler.is_compiling():  # no Python-side cache inside a compiled graph
            return self._select()
        scores = self.scores
        key = (scores._version, scores.data_ptr())  # in place: _version; `.to()` or `.data =`: the storage
        cache = self._mask_cache
        if cache is None or cache[0] != key:
            cache = self._mask_cache = (key, self._select())
        return cache[1]

    def _select(self) -> torch.Tensor:
        scores = self.scores
        if self.masker == "torch" or (self.masker is None and scores.device.type != "cpu"):
            return topk_mask(scores.detach().abs(), self.kept, masker="torch")
        select = _numpy_layer_mask_eager if torch.compiler.is_compiling() else _numpy_layer_mask
        return select(scores, self.kept, self._threshold_hint)

    def effective_weight(self) -> torch.Tensor:
        """weight * mask; with gradients on, the straight-through product that trains the scores."""
        mask, weight, scores = self.mask(), self.weight, self.scores
        # the numpy masker's product runs in NumPy too (CPU only; under compile, torch's product traces)
        numpy_product = (
            self.masker != "torch"
            and mask.device.type == "cpu"
            and weight.device.type == "cpu"
            and weight.dtype in NUMPY_DTYPES
            and not torch.compiler.is_compiling()
        )
        if scores.requires_grad and torch.is_grad_enabled():
            return _StraightThroughMask.apply(scores, weight, mask, numpy_product)
        return _masked_product(weight, mask, numpy_product)

    def extra_repr(self) -> str:  # noqa: D401 - nn.Module hook
        return f"{super().extra_repr()}, k={self.k}"


class _MaskedConv(_MaskedMixin):
    """Shared by the masked convolutions: bias-free, the weight fixed and masked by the top-k of the scores."""

    def _init_conv(
        self,
        base: type,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride,
        padding,
        dilation,
        groups: int,
        k: float,
        padding_mode: str,
        device,
    ) -> None:
        base.__init__(
            self,
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=padding,
            dilation=dilation,
            groups=groups,
            bias=False,
            padding_mode=padding_mode,
            device=device,
        )
        self._init_masking(k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.effective_weight(), None)


class MaskedConv1d(_MaskedConv, nn.Conv1d):
    """A bias-free Conv1d whose weight is fixed and masked by the top-k of its scores."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        groups: int = 1,
        *,
        k: float = 0.5,
        padding_mode: str = "zeros",
        device=None,
    ) -> None:
        self._init_conv(
            nn.Conv1d,
            in_channels,
            out_channels,
            kernel_size,
            stride,
            padding,
            dilation,
            groups,
            k,
            padding_mode,
            device,
        )


class MaskedConv2d(_MaskedConv, nn.Conv2d):
    """A bias-free Conv2d whose weight is fixed and masked by the top-k of its scores."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        groups: int = 1,
        *,
        k: float = 0.5,
        padding_mode: str = "zeros",
        device=None,
    ) -> None:
        self._init_conv(
            nn.Conv2d,
            in_channels,
            out_channels,
            kernel_size,
            stride,
            padding,
            dilation,
            groups,
            k,
            padding_mode,
            device,
        )


class MaskedConv3d(_MaskedConv, nn.Conv3d):
    """A bias-free Conv3d whose weight is fixed and masked by the top-k of its scores."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        groups: int = 1,
        *,
        k: float = 0.5,
        padding_mode: str = "zeros",
        device=None,
    ) -> None:
        self._init_conv(
            nn.Conv3d,
            in_channels,
            out_channels,
            kernel_size,
            stride,
            padding,
            dilation,
            groups,
            k,
            padding_mode,
            device,
        )


class MaskedLinear(_MaskedMixin, nn.Linear):
    """A bias-free Linear whose weight is fixed and masked by the top-k of its scores."""

    def __init__(self, in_features: int, out_features: int, *, k: float = 0.5, device=None) -> None:
        nn.Linear.__init__(self, in_features, out_features, bias=False, device=device)
        self._init_masking(k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.effective_weight())


MASKED_TYPES = (MaskedConv1d, MaskedConv2d, MaskedConv3d, MaskedLinear)


def layer_weight(layer: nn.Module) -> torch.Tensor:
    """The weight a layer computes with: a masked layer's (or any layer's) `effective_weight()`, else its own."""
    effective = getattr(layer, "effective_weight", None)
    return effective() if effective is not None else typing.cast(torch.Tensor, layer.weight)


class ProjectedAttention(nn.Module):
    """`nn.MultiheadAttention` (same arguments and outputs) with its packed input projection held by a
    Linear child `in_proj` (embed_dim -> 3 * embed_dim) and its output projection by `out_proj`, both
    bias-free, so that the generic layer rules mask them (MaskedLinear) or bake them (plain Linear).

    Only the self-contained form is supported: key and value of the query's size, no bias_k/bias_v
    (maskforge.convert refuses the others in one line).
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        *,
        dropout: float = 0.0,
        add_zero_attn: bool = False,
        batch_first: bool = False,
        k: float = 0.5,
        device=None,
    ) -> None:
        super().__init__()
        self.embed_dim, self.num_heads = embed_dim, num_heads
        self.dropout, self.add_zero_attn, self.batch_first = float(dropout), add_zero_attn, batch_first
        self.in_proj = MaskedLinear(embed_dim, 3 * embed_dim, k=k, device=device)
        self.out_proj = MaskedLinear(embed_dim, embed_dim, k=k, device=device)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask=None,
        need_weights: bool = True,
        attn_mask=None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ):
        if self.batch_first:  # as nn.MultiheadAttention: keep q is k is v, so the projection is one matmul
            if key is value:
                if query is key:
                    query = key = value = query.transpose(1, 0)
                else:
                    query, key = (x.transpose(1, 0) for x in (query, key))
                    value = key
            else:
                query, key, value = (x.transpose(1, 0) for x in (query, key, value))
        out, weights = F.multi_head_attention_forward(
            query,
            key,
            value,
            self.embed_dim,
            self.num_heads,
            layer_weight(self.in_proj),
            None,
            None,
            None,
            self.add_zero_attn,
            self.dropout,
            layer_weight(self.out_proj),
            None,
            training=self.training,
            key_padding_mask=key_padding_mask,
            need_weights=need_weights,
            attn_mask=attn_mask,
            average_attn_weights=average_attn_weights,
            is_causal=is_causal,
        )
        return (out.transpose(1, 0) if self.batch_first else out), weights

    def extra_repr(self) -> str:  # noqa: D401 - nn.Module hook
        return f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, batch_first={self.batch_first}"


def NonAffineBatchNorm2d(num_features: int, device=None) -> nn.BatchNorm2d:
    """Batch norm without learned scale/bias (the paper's choice) that keeps running statistics."""
    return nn.BatchNorm2d(num_features, affine=False, track_running_stats=True, device=device)


def masked_modules(model: nn.Module) -> dict[str, _MaskedMixin]:
    """name -> masked layer, in module order."""
    return {name: module for name, module in model.named_modules() if isinstance(module, MASKED_TYPES)}


def batchnorm_modules(model: nn.Module) -> dict[str, nn.modules.batchnorm._BatchNorm]:
    return {
        name: module for name, module in model.named_modules() if isinstance(module, nn.modules.batchnorm._BatchNorm)
    }


# --- choosing the masker and the top-k rule of a whole model ----------------------------------------------


def set_masker(model: nn.Module, name: str | None) -> None:
    """Select the masker of every masked layer: "numpy", "torch", or None/"auto" (follow the device).

    Both maskers give the same masks, forward values and score gradients (see `maskforge.topk`).

    >>> from maskforge import archs
    >>> model = archs.create_model("fc", k=0.5)
    >>> set_masker(model, "torch")
    """
    name = check_masker(name)
    for layer in masked_modules(model).values():
        layer.masker = name
        layer._mask_cache = None


class GlobalTopK:
    """One top-k over all masked layers of a model (`topk.global_topk_masks`), shared by those layers.

    The masks are computed once per score update: the first layer that asks after the scores changed
    triggers one selection for all layers, the others read the result. It uses the masker of the first
    masked layer and keeps its own threshold hint.
    """

    def __init__(self, layers: list[_MaskedMixin], k: float) -> None:
        if not layers:
            raise MaskforgeError("global top-k needs at least one masked layer")
        self.layers = list(layers)
        self.k = float(k)
        self._position = {layer: i for i, layer in enumerate(self.layers)}
        self._hint = ThresholdHint()
        self._cache: tuple[tuple, list[torch.Tensor]] | None = None

    def masks(self) -> list[torch.Tensor]:
        """The masks of all layers, in layer order."""
        if torch.compiler.is_compiling():
            return _global_masks_eager(self)
        return self._current()

    def mask_of(self, layer: _MaskedMixin) -> torch.Tensor:
        return self.masks()[self._position[layer]]

    def _current(self) -> list[torch.Tensor]:
        key = tuple((layer.scores._version, layer.scores.data_ptr()) for layer in self.layers)
        if self._cache is None or self._cache[0] != key:
            masks = global_topk_masks(
                [layer.scores for layer in self.layers], self.k, masker=self.layers[0].masker, hint=self._hint
            )
            self._cache = (key, masks)
        return self._cache[1]


_global_masks_eager = torch.compiler.disable(GlobalTopK._current)


def set_topk(model: nn.Module, rule: str, k: float | None = None) -> GlobalTopK | None:
    """Choose how `model`'s masked layers select their weights: "layer" (the paper's per-layer top-k,
    the default) or "global" (one threshold over all masked layers; rule in `topk.global_topk_masks`).

    `k` (global only) defaults to the layers' common k. Returns the shared selector for "global".

    >>> from maskforge import archs
    >>> model = archs.create_model("fc", k=0.3)
    >>> selector = set_topk(model, "global")
    >>> sum(int(m.sum()) for m in selector.masks()) == kept_count(266200, 0.3)
    True
    """
    if rule not in TOPK_RULES:
        raise MaskforgeError(f"unknown top-k rule {rule!r}; choose from: {', '.join(TOPK_RULES)}")
    layers = list(masked_modules(model).values())
    if rule == "layer":
        for layer in layers:
            layer.global_topk = None
        return None
    if k is None:
        ks = {layer.k for layer in layers}
        if len(ks) > 1:
            raise MaskforgeError(f"the masked layers have different k ({sorted(ks)}): give global top-k one k")
        k = ks.pop() if ks else 0.5
    if not 0.0 < k <= 1.0:
        raise MaskforgeError(f"k must be in (0, 1], got {k}")
    selector = GlobalTopK(layers, k)
    for layer in layers:
        layer.k = float(k)
        layer.global_topk = selector
        layer._mask_cache = None  # a mask cached under the old rule or k no longer holds
    return selector


def get_topk(model: nn.Module) -> str:
    """ "global" if `model`'s masked layers share a global top-k selector, else "layer"."""
    layers = masked_modules(model).values()
    return "global" if any(layer.global_topk is not None for layer in layers) else "layer"

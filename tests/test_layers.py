"""Tests for maskforge.layers: the top-k mask against a sort, the straight-through gradient against a dense
autograd computation, and the parameter/buffer contract of the masked layers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from maskforge import layers as L
from maskforge.layers import (
    MaskedConv2d,
    MaskedLinear,
    NonAffineBatchNorm2d,
    batchnorm_modules,
    kept_count,
    masked_modules,
    topk_mask,
)


def sort_order(magnitudes: torch.Tensor) -> np.ndarray:
    """Flat indices sorted by (-|s|, flat index), NaN first (as the largest): a stable descending sort."""
    flat = magnitudes.reshape(-1).double().numpy()
    nan = np.isnan(flat)
    return np.lexsort((np.arange(flat.size), -np.where(nan, 0.0, flat), ~nan))  # last key is primary


def sort_oracle(magnitudes: torch.Tensor, kept: int) -> torch.Tensor:
    """Keep the first `kept` entries of the order sorted by (-|s|, flat index); NaN counts as largest."""
    mask = np.zeros(magnitudes.numel(), dtype=bool)
    mask[sort_order(magnitudes)[:kept]] = True
    return torch.from_numpy(mask.reshape(tuple(magnitudes.shape)))


# ---------------------------------------------------------------------------------------------------------
# kept_count and topk_mask
# ---------------------------------------------------------------------------------------------------------


def test_kept_count_rule():
    from decimal import ROUND_HALF_EVEN, Decimal

    for numel in (1, 2, 3, 7, 10, 100, 999, 12345):
        for k in (1e-9, 0.01, 0.05, 0.1, 0.25, 0.3, 0.5, 0.7, 0.99, 1.0):
            # exact value of the float product k*numel, rounded half to even, clamped to [1, numel]
            product = Decimal(k * numel)
            expected = int(product.to_integral_value(rounding=ROUND_HALF_EVEN))
            expected = min(numel, max(1, expected))
            assert kept_count(numel, k) == expected, (numel, k)
    assert kept_count(10, 0.25) == 2  # 2.5 -> 2 (half to even)
    assert kept_count(10, 0.35) == 4  # 3.5 -> 4
    assert kept_count(2, 0.25) == 1  # 0.5 -> 0, but at least one weight stays
    assert kept_count(1000, 0.0001) == 1
    assert kept_count(7, 1.0) == 7


@pytest.mark.parametrize("shape", [(1,), (7,), (4, 5), (3, 2, 3, 3), (64, 27)])
def test_topk_mask_matches_sort_on_distinct_values(shape):
    gen = torch.Generator().manual_seed(sum(shape))
    s = torch.randn(shape, generator=gen).abs()
    n = s.numel()
    for kept in range(1, n + 1):
        mask = topk_mask(s, kept)
        assert mask.dtype == torch.bool and mask.shape == s.shape
        assert torch.equal(mask, sort_oracle(s, kept)), kept


@pytest.mark.parametrize("shape,levels", [((50,), 2), ((6, 7), 3), ((2, 3, 4, 5), 5), ((8, 8, 3, 3), 4), ((40,), 1)])
def test_topk_mask_matches_stable_sort_with_many_ties(shape, levels):
    gen = torch.Generator().manual_seed(levels * 31 + len(shape))
    s = torch.randint(0, levels, shape, generator=gen).float()
    n = s.numel()
    for kept in range(1, n + 1):
        assert torch.equal(topk_mask(s, kept), sort_oracle(s, kept)), kept


def test_topk_mask_keeps_exactly_kept_and_handles_extremes():
    s = torch.zeros(10)
    assert topk_mask(s, 3).tolist() == [True] * 3 + [False] * 7
    assert topk_mask(s, 10).all() and topk_mask(s, 25).all()
    s = torch.tensor([0.0, float("inf"), 1.0, 1.0])
    assert topk_mask(s, 1).tolist() == [False, True, False, False]
    assert topk_mask(s, 2).tolist() == [False, True, True, False]


def test_topk_mask_on_a_noncontiguous_view():
    base = torch.randint(0, 3, (6, 8), generator=torch.Generator().manual_seed(1)).float()
    view = base.t()  # not contiguous; flat C order of the view is what counts
    for kept in (1, 5, 24, 47):
        assert torch.equal(topk_mask(view, kept), sort_oracle(view.contiguous(), kept))


def test_topk_mask_nan_counts_as_largest():
    s = torch.tensor([1.0, float("nan"), 3.0, float("nan"), 2.0, float("inf")])
    for kept in range(1, 7):
        assert torch.equal(topk_mask(s, kept), sort_oracle(s, kept)), kept
    assert topk_mask(s, 2).tolist() == [False, True, False, True, False, False]


def _hint(threshold, width):
    hint = L.ThresholdHint()
    hint.threshold, hint.width = threshold, width
    return hint


@pytest.mark.parametrize("levels", [None, 50, 3])
def test_topk_mask_is_exact_whatever_the_threshold_hint(levels):
    """The hint may only speed the selection up: accurate, stale, far-off or tiny bands give the same mask."""
    gen = torch.Generator().manual_seed(levels or 0)
    n = 40_000  # above the size where the band search is used
    if levels is None:
        s = torch.randn(n, generator=gen).abs()
    else:
        s = torch.randint(0, levels, (n,), generator=gen).float()
    for kept in (1, 137, n // 3, n // 2, n - 1):
        exact = sort_oracle(s, kept)
        true_threshold = float(s[exact].min())
        hints = [
            _hint(true_threshold, 0.0),
            _hint(true_threshold, 1e-3),
            _hint(true_threshold + 1e-4, 1e-5),
            _hint(true_threshold * 0.5, 1e-2),
            _hint(true_threshold * 2 + 1, 1e-2),
            _hint(100.0, 1e6),
            _hint(-5.0, 0.1),
            L.ThresholdHint(),
        ]
        for hint in hints:
            assert torch.equal(topk_mask(s, kept, hint), exact), (kept, hint.threshold, hint.width)
        # the hint was updated to the true threshold
        assert hints[0].threshold == true_threshold


def test_training_a_large_layer_keeps_exact_masks():
    """A layer big enough for the band search, trained for some steps: every mask and every forward is
    what the full sort gives (the hint follows the moving threshold)."""
    layer = MaskedLinear(200, 100, k=0.3)
    _fill(layer, 21)
    opt = torch.optim.SGD(layer.parameters(), lr=0.05, momentum=0.9)
    x = torch.randn(16, 200, generator=torch.Generator().manual_seed(22))
    target = torch.arange(16) % 100
    for step in range(6):
        expected_mask = sort_oracle(layer.scores.detach().abs(), layer.kept)
        out = layer(x)
        torch.testing.assert_close(out, F.linear(x, layer.weight * expected_mask), rtol=0, atol=0)
        assert torch.equal(layer.mask(), expected_mask), step
        opt.zero_grad()
        F.cross_entropy(out, target).backward()
        opt.step()
    assert torch.equal(layer.mask(), sort_oracle(layer.scores.detach().abs(), layer.kept))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_topk_mask_cuda_branch_matches_cpu():
    gen = torch.Generator().manual_seed(5)
    for shape, levels in [((1000,), 3), ((64, 3, 3, 3), 7), ((300, 100), 1000), ((17,), 1)]:
        s = torch.randint(0, levels, shape, generator=gen).float()
        for kept in sorted({1, 2, s.numel() // 3, s.numel() // 2, s.numel() - 1, s.numel()}):
            gpu = topk_mask(s.cuda(), kept)
            assert gpu.is_cuda
            assert torch.equal(gpu.cpu(), topk_mask(s, kept))
            assert torch.equal(gpu.cpu(), sort_oracle(s, kept))


# ---------------------------------------------------------------------------------------------------------
# Forward and the straight-through gradient against dense autograd
# ---------------------------------------------------------------------------------------------------------


def _fill(layer, seed: int, ties: bool = False) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(layer.weight.shape, generator=gen))
        if ties:
            layer.scores.copy_(torch.randint(-3, 4, layer.scores.shape, generator=gen).float())
        else:
            layer.scores.copy_(torch.randn(layer.scores.shape, generator=gen))


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("k", [0.05, 0.3, 0.5, 1.0])
def test_masked_conv2d_forward_and_score_gradient(k, ties):
    layer = MaskedConv2d(3, 5, 3, stride=2, padding=1, k=k)
    _fill(layer, 1, ties)
    x = torch.randn(4, 3, 9, 9, generator=torch.Generator().manual_seed(2), requires_grad=True)
    g = torch.randn(4, 5, 5, 5, generator=torch.Generator().manual_seed(3))

    out = layer(x)
    (out * g).sum().backward()

    w = layer.weight.detach().clone()
    s = layer.scores.detach().clone()
    m = sort_oracle(s.abs(), kept_count(w.numel(), k)).float()
    w_eff = (w * m).requires_grad_(True)
    x2 = x.detach().clone().requires_grad_(True)
    ref = F.conv2d(x2, w_eff, stride=2, padding=1)
    (ref * g).sum().backward()

    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    torch.testing.assert_close(layer.scores.grad, w_eff.grad * w * torch.sign(s), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(x.grad, x2.grad, rtol=0, atol=0)
    assert layer.weight.grad is None and not layer.weight.requires_grad


@pytest.mark.parametrize("k", [0.01, 0.5, 0.9])
def test_masked_linear_forward_and_score_gradient(k):
    layer = MaskedLinear(20, 7, k=k)
    _fill(layer, 4, ties=True)
    x = torch.randn(6, 20, generator=torch.Generator().manual_seed(5))
    target = torch.randint(0, 7, (6,), generator=torch.Generator().manual_seed(6))

    F.cross_entropy(layer(x), target).backward()

    w, s = layer.weight.detach().clone(), layer.scores.detach().clone()
    m = sort_oracle(s.abs(), kept_count(w.numel(), k)).float()
    w_eff = (w * m).requires_grad_(True)
    ref = F.linear(x, w_eff)
    F.cross_entropy(ref, target).backward()

    torch.testing.assert_close(layer(x), ref, rtol=0, atol=0)
    # straight-through: dropped weights get gradient too (h is the identity backward)
    expected = w_eff.grad * w * torch.sign(s)
    torch.testing.assert_close(layer.scores.grad, expected, rtol=1e-6, atol=1e-7)
    dropped = m == 0
    if dropped.any():
        assert (layer.scores.grad[dropped] != 0).any()


def test_eval_path_without_grad_equals_training_path():
    layer = MaskedConv2d(2, 4, 3, padding=1, k=0.4)
    _fill(layer, 7)
    x = torch.randn(2, 2, 6, 6)
    with_grad = layer(x)
    with torch.no_grad():
        without = layer(x)
    assert torch.equal(with_grad.detach(), without)
    assert torch.equal(layer.mask(), sort_oracle(layer.scores.detach().abs(), layer.kept))


def test_groups_and_dilation_are_respected():
    layer = MaskedConv2d(4, 6, 3, padding=2, dilation=2, groups=2, k=0.5)
    _fill(layer, 8)
    x = torch.randn(1, 4, 7, 7)
    m = sort_oracle(layer.scores.detach().abs(), layer.kept).float()
    ref = F.conv2d(x, layer.weight * m, padding=2, dilation=2, groups=2)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), ref, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------------
# Parameters, buffers, caching
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("make", [lambda: MaskedConv2d(3, 4, 3, k=0.5), lambda: MaskedLinear(5, 3, k=0.5)])
def test_weights_are_non_persistent_buffers_and_scores_the_only_parameters(make):
    layer = make()
    names = [n for n, _ in layer.named_parameters()]
    assert names == ["scores"]
    assert "weight" in dict(layer.named_buffers())
    assert set(layer.state_dict()) == {"scores"}
    assert layer.bias is None
    assert layer.scores.shape == layer.weight.shape
    assert "k=0.5" in repr(layer)


def test_optimizer_step_changes_only_scores():
    model = nn.Sequential(
        MaskedConv2d(1, 4, 3, padding=1, k=0.5),
        NonAffineBatchNorm2d(4),
        nn.ReLU(),
        nn.Flatten(),
        MaskedLinear(4 * 5 * 5, 3, k=0.3),
    )
    for i, layer in enumerate(masked_modules(model).values()):
        _fill(layer, 10 + i)
    weights = {n: b.clone() for n, b in model.named_buffers() if n.endswith("weight")}
    scores = {n: p.clone() for n, p in model.named_parameters()}
    masks = {n: layer.mask().clone() for n, layer in masked_modules(model).items()}
    opt = torch.optim.SGD(model.parameters(), lr=5.0, momentum=0.9)
    x = torch.randn(8, 1, 5, 5)
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(model(x), torch.arange(8) % 3).backward()
        opt.step()
    for n, w in weights.items():
        assert torch.equal(model.get_buffer(n), w)
    for n, s in scores.items():
        assert not torch.equal(model.get_parameter(n), s)
    # the cached mask followed the in-place optimizer updates
    changed = False
    for n, layer in masked_modules(model).items():
        fresh = sort_oracle(layer.scores.detach().abs(), layer.kept)
        assert torch.equal(layer.mask(), fresh)
        changed |= not torch.equal(fresh, masks[n])
    assert changed, "lr 5 for 3 steps should have changed some mask"
    # the BN is non-affine and tracked statistics during the forward passes
    bn = batchnorm_modules(model)["1"]
    assert bn.weight is None and bn.bias is None and bn.track_running_stats
    assert bn.num_batches_tracked.item() == 3 and not torch.equal(bn.running_mean, torch.zeros(4))


def test_mask_cache_invalidates_on_in_place_change():
    layer = MaskedLinear(10, 10, k=0.2)
    _fill(layer, 3)
    first = layer.mask()
    assert layer.mask() is first  # cached
    with torch.no_grad():
        layer.scores.neg_().mul_(torch.linspace(-1, 1, 100).view(10, 10))
    second = layer.mask()
    assert second is not first
    assert torch.equal(second, sort_oracle(layer.scores.detach().abs(), layer.kept))
    with torch.no_grad():
        layer.scores.copy_(torch.arange(100.0).view(10, 10))
    assert layer.mask().reshape(-1).nonzero().squeeze(1).tolist() == list(range(80, 100))


def test_masked_modules_and_batchnorm_modules_listing():
    model = nn.Sequential(
        MaskedConv2d(1, 2, 3, k=0.5), NonAffineBatchNorm2d(2), nn.Sequential(nn.Flatten(), MaskedLinear(8, 2, k=0.5))
    )
    assert list(masked_modules(model)) == ["0", "2.1"]
    assert list(batchnorm_modules(model)) == ["1"]
    assert math.isclose(kept_count(model[0].weight.numel(), 0.5), model[0].kept)


def test_threshold_hint_never_changes_the_mask():
    """The band-hint fast path (layers of >= _BAND_MIN_SIZE weights) against the sort oracle, over a
    sequence of small score updates like an optimizer's, big jumps (the band misses) and planted ties."""
    from maskforge.topk import BAND_MIN_SIZE as _BAND_MIN_SIZE, ThresholdHint

    generator = torch.Generator().manual_seed(7)
    numel = _BAND_MIN_SIZE * 2 + 13
    scores = torch.randn(numel, generator=generator)
    hint = ThresholdHint()
    for step in range(40):
        kept = kept_count(numel, 0.3 if step < 20 else 0.7)
        if step % 9 == 8:
            scores = scores * 3.0 + 1.0  # the threshold jumps far outside the band
        else:
            scores = scores + 0.01 * torch.randn(numel, generator=generator)
        if step % 5 == 0:  # plant ties straddling the current threshold
            order = torch.argsort(scores.abs(), descending=True, stable=True)
            scores[order[kept - 3 : kept + 3]] = scores[order[kept]].abs()
        magnitudes = scores.abs()
        oracle = torch.zeros(numel, dtype=torch.bool)
        oracle[torch.argsort(-magnitudes, stable=True)[:kept]] = True
        assert torch.equal(topk_mask(magnitudes, kept, hint), oracle), f"step {step}"

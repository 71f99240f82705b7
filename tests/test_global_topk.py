"""Global top-k: one threshold over all masked layers, at least one weight per layer.

The oracle is a direct transcription of the rule in `maskforge.topk.global_topk_masks` with NumPy's
lexsort: each layer's best entry by (-|s|, index) is kept, then the best K - L of all other entries by
(-|s|, layer, index), NaN largest. It shares no code with the partition/topk maskers under test.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from maskforge import topk
from maskforge.errors import MaskforgeError
from maskforge.layers import (
    MaskedConv2d,
    MaskedLinear,
    NonAffineBatchNorm2d,
    get_topk,
    kept_count,
    masked_modules,
    set_masker,
    set_topk,
)
from maskforge.topk import MASKERS, global_kept_count, global_topk_masks
from test_layers import sort_oracle


def global_oracle(scores: list[torch.Tensor], k: float) -> list[torch.Tensor]:
    sizes = [s.numel() for s in scores]
    total = max(len(sizes), kept_count(sum(sizes), k))
    values = np.concatenate([s.detach().double().abs().reshape(-1).numpy() for s in scores])
    layer = np.concatenate([np.full(n, i) for i, n in enumerate(sizes)])
    index = np.concatenate([np.arange(n) for n in sizes])
    nan = np.isnan(values)
    # lexsort: the last key is the primary one -> NaN first, then larger |s|, then layer, then index
    order = np.lexsort((index, layer, -np.where(nan, 0.0, values), ~nan))
    keep = np.zeros(values.size, dtype=bool)
    seen: set[int] = set()
    for position in order:  # the first entry of each layer in this order is that layer's own best
        if layer[position] not in seen:
            seen.add(int(layer[position]))
            keep[position] = True
    rest = [p for p in order if not keep[p]][: total - len(sizes)]
    keep[rest] = True
    parts = np.split(keep, np.cumsum(sizes)[:-1])
    return [torch.from_numpy(part.reshape(tuple(s.shape))) for part, s in zip(parts, scores)]


def _random_layers(seed: int, shapes, levels: int | None) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    if levels is None:
        return [torch.randn(shape, generator=gen) for shape in shapes]
    return [(torch.randint(-levels, levels + 1, shape, generator=gen).float()) for shape in shapes]


SHAPES = [(6, 3, 3, 3), (40, 30), (7,), (10, 40)]


@pytest.mark.parametrize("masker", MASKERS)
@pytest.mark.parametrize("levels", [None, 3, 0])
@pytest.mark.parametrize("k", [0.001, 0.05, 0.3, 0.5, 0.97, 1.0])
def test_global_masks_match_the_oracle(masker, levels, k):
    """Distinct values, heavy ties across layers (levels 3), and all-equal scores (levels 0: pure index
    order), from nearly nothing kept (k 0.001: fewer than one per layer) to everything."""
    scores = _random_layers(int(k * 1000) + (levels or 0), SHAPES, levels)
    masks = global_topk_masks(scores, k, masker=masker)
    expected = global_oracle(scores, k)
    for got, want in zip(masks, expected):
        assert got.dtype == torch.bool and got.shape == want.shape
        assert torch.equal(got, want)
    sizes = [s.numel() for s in scores]
    assert sum(int(m.sum()) for m in masks) == global_kept_count(sizes, k) == max(4, kept_count(sum(sizes), k))
    assert all(m.any() for m in masks)


@pytest.mark.parametrize("masker", MASKERS)
def test_a_starved_layer_keeps_its_best_weight(masker):
    """A layer whose scores are all below the global threshold still keeps exactly its largest one (the
    lowest index among its ties), and the total stays K."""
    gen = torch.Generator().manual_seed(1)
    big = torch.rand(50, 20, generator=gen) + 1.0
    starved = torch.full((3, 4), 1e-3)
    starved[1, 2] = starved[2, 0] = 2e-3  # tied best: the lower flat index (6) wins
    masks = global_topk_masks([big, starved, big.clone()], 0.2, masker=masker)
    assert masks[1].reshape(-1).nonzero().squeeze(1).tolist() == [6]
    assert sum(int(m.sum()) for m in masks) == kept_count(2012, 0.2)
    for got, want in zip(masks, global_oracle([big, starved, big.clone()], 0.2)):
        assert torch.equal(got, want)


@pytest.mark.parametrize("masker", MASKERS)
def test_global_masks_with_nan_and_low_precision_scores(masker):
    scores = _random_layers(2, SHAPES, None)
    scores[1][0, :5] = float("nan")
    scores[3][2, 7] = float("nan")
    scores[2] = scores[2].to(torch.bfloat16)  # mixed dtypes: compared exactly in float32
    for k in (0.004, 0.3):
        for got, want in zip(global_topk_masks(scores, k, masker=masker), global_oracle(scores, k)):
            assert torch.equal(got, want), k


def test_one_layer_global_equals_per_layer():
    scores = _random_layers(3, [(30, 20)], 2)
    for k in (0.01, 0.5, 0.9):
        assert torch.equal(global_topk_masks(scores, k)[0], sort_oracle(scores[0].abs(), kept_count(600, k)))


def test_global_masks_on_millions_of_weights_and_both_maskers_agree():
    scores = _random_layers(4, [(1000, 1000), (500, 1000), (10,)], 20_000)
    numpy_masks = global_topk_masks(scores, 0.3, masker="numpy")
    torch_masks = global_topk_masks(scores, 0.3, masker="torch")
    expected = global_oracle(scores, 0.3)
    for a, b, want in zip(numpy_masks, torch_masks, expected):
        assert torch.equal(a, want) and torch.equal(b, want)


# ---------------------------------------------------------------------------------------------------------
# A model using the global selection
# ---------------------------------------------------------------------------------------------------------


def _model(seed: int, k: float = 0.3) -> nn.Module:
    model = nn.Sequential(
        MaskedConv2d(1, 8, 3, padding=1, k=k),
        NonAffineBatchNorm2d(8),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        MaskedLinear(8 * 4 * 4, 16, k=k),
        nn.ReLU(),
        MaskedLinear(16, 3, k=k),
    )
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in masked_modules(model).values():
            fan_in = layer.weight[0].numel()
            layer.weight.copy_(torch.randn(layer.weight.shape, generator=gen) * (2.0 / fan_in) ** 0.5)
            layer.scores.copy_(torch.randn(layer.scores.shape, generator=gen) * 0.1)
    return model


def _toy_batch(n: int = 48):
    """Three classes of 8x8 images told apart by where a bright square sits."""
    gen = torch.Generator().manual_seed(5)
    y = torch.arange(n) % 3
    x = torch.randn(n, 1, 8, 8, generator=gen) * 0.3
    for i, label in enumerate(y.tolist()):
        x[i, 0, 2 * label : 2 * label + 3, 2 * label : 2 * label + 3] += 2.0
    return x, y


@pytest.mark.parametrize("masker", MASKERS)
def test_model_with_global_topk_trains_and_follows_the_oracle(masker):
    model = _model(6)
    set_masker(model, masker)
    selector = set_topk(model, "global", 0.3)
    assert get_topk(model) == "global" and selector.k == 0.3
    layers = list(masked_modules(model).values())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    x, y = _toy_batch()
    losses = []
    for step in range(20):
        expected = global_oracle([layer.scores for layer in layers], 0.3) if step % 4 == 0 else None
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        for i, layer in enumerate(layers):
            assert expected is None or torch.equal(layer.mask(), expected[i])
            assert layer.scores.grad is not None and layer.scores.grad.abs().sum() > 0
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
    total = sum(layer.weight.numel() for layer in layers)
    assert sum(int(layer.mask().sum()) for layer in layers) == kept_count(total, 0.3)


def test_global_topk_score_gradient_is_the_straight_through_one():
    model = _model(7)
    set_topk(model, "global")
    x, y = _toy_batch(12)
    F.cross_entropy(model(x), y).backward()
    layers = list(masked_modules(model).values())
    masks = global_oracle([layer.scores for layer in layers], 0.3)
    # the same network with its masked weights as plain leaves: d loss / d w_eff by ordinary autograd
    plain = [(layer.weight * mask).requires_grad_(True) for layer, mask in zip(layers, masks)]
    h = F.relu(F.batch_norm(F.conv2d(x, plain[0], padding=1), None, None, training=True))
    h = F.relu(F.linear(F.max_pool2d(h, 2).flatten(1), plain[1]))
    F.cross_entropy(F.linear(h, plain[2]), y).backward()
    for layer, w_eff in zip(layers, plain):
        expected = w_eff.grad * layer.weight * torch.sign(layer.scores.detach())
        torch.testing.assert_close(layer.scores.grad, expected, rtol=1e-6, atol=1e-9)


def test_global_selection_runs_once_per_score_update(monkeypatch):
    import maskforge.layers as layers_module

    calls = []
    original = layers_module.global_topk_masks
    monkeypatch.setattr(layers_module, "global_topk_masks", lambda *a, **kw: calls.append(1) or original(*a, **kw))
    model = _model(8)
    set_topk(model, "global")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = _toy_batch(6)
    for step in range(3):
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        assert len(calls) == step + 1  # three layers, one selection
        for layer in masked_modules(model).values():
            layer.mask()  # reading masks between steps selects nothing new
        assert len(calls) == step + 1
        optimizer.step()


def test_back_to_per_layer_and_bad_rules():
    model = _model(9, k=0.3)
    set_topk(model, "global")
    set_topk(model, "layer")
    assert get_topk(model) == "layer"
    for layer in masked_modules(model).values():
        assert torch.equal(layer.mask(), sort_oracle(layer.scores.detach().abs(), layer.kept))
    with pytest.raises(MaskforgeError) as caught:
        set_topk(model, "pernet")
    assert str(caught.value) == "unknown top-k rule 'pernet'; choose from: layer, global"
    model[0].k = 0.5
    with pytest.raises(MaskforgeError) as caught:
        set_topk(model, "global")
    assert str(caught.value) == ("the masked layers have different k ([0.3, 0.5]): give global top-k one k")
    with pytest.raises(MaskforgeError) as caught:
        set_topk(model, "global", 1.5)
    assert str(caught.value) == "k must be in (0, 1], got 1.5"
    assert get_topk(model) == "layer"


def test_global_kept_count_rule():
    assert global_kept_count([10, 10, 10], 0.5) == 15
    assert global_kept_count([1000, 2, 3], 0.001) == 3  # kept_count(1005, 0.001) = 1 < 3 layers
    assert topk.global_kept_count([5], 1.0) == 5


@pytest.mark.parametrize("masker", MASKERS)
def test_global_topk_inside_torch_compile_matches_eager(masker):
    """The shared selection runs eagerly at a graph break; outputs and score gradients equal eager's."""
    eager, source = _model(10), _model(10)
    for model in (eager, source):
        set_masker(model, masker)
        set_topk(model, "global")
    compiled = torch.compile(source, backend="aot_eager")
    x, _ = _toy_batch(12)
    torch._dynamo.reset()
    out_eager, out_compiled = eager(x), compiled(x)
    out_eager.square().sum().backward()
    out_compiled.square().sum().backward()
    assert torch.equal(out_compiled, out_eager)
    for a, b in zip(masked_modules(eager).values(), masked_modules(source).values()):
        assert torch.equal(b.scores.grad, a.scores.grad) and torch.equal(b.mask(), a.mask())

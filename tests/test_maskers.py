"""The two maskers ("numpy" and "torch") against a stable-sort oracle on CPU tensors, and against each
other in masked layers: same masks, same forward bits, same score-gradient bits, inside torch.compile too.

The oracle (`sort_oracle`, shared with test_layers.py) is NumPy's lexsort by (-value, flat index) in
float64, NaN first: an ordinary sort, not the partition/topk code under test.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from maskforge.errors import MaskforgeError
from maskforge.layers import (
    MaskedConv2d,
    MaskedLinear,
    NonAffineBatchNorm2d,
    ThresholdHint,
    kept_count,
    masked_modules,
    set_masker,
    topk_mask,
)
from maskforge.topk import BAND_MIN_SIZE, MASKERS, resolve_masker
from test_layers import sort_oracle

NAN, INF = float("nan"), float("inf")


def _values(kind: str, n: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Score magnitudes of one kind: distinct, heavily tied, signed zeros, or with NaN and infinities."""
    gen = torch.Generator().manual_seed(seed)
    if kind == "distinct":
        values = torch.rand(n, generator=gen)
    elif kind == "ties":
        values = torch.randint(0, 4, (n,), generator=gen).float() * 0.25
    elif kind == "signed_zeros":  # -0.0 and +0.0 are equal values: ties broken by index alone
        values = torch.randint(0, 3, (n,), generator=gen).float() * 0.5
        values = torch.where((values == 0) & (torch.rand(n, generator=gen) < 0.5), -0.0, values)
    else:  # "nan_inf" (10 % NaN) or "mostly_nan" (70 %: the threshold itself is NaN for most kept)
        values = torch.rand(n, generator=gen)
        pick = torch.rand(n, generator=gen)
        share = 0.7 if kind == "mostly_nan" else 0.1
        values[pick < share] = NAN
        values[(pick >= share) & (pick < share + 0.05)] = INF
    return values.to(dtype)


def _kept_cases(n: int) -> list[int]:
    return sorted({1, 2, n // 3, n // 2, (3 * n) // 4, n - 1, n} - {0})


@pytest.mark.parametrize("masker", MASKERS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["distinct", "ties", "signed_zeros", "nan_inf", "mostly_nan"])
@pytest.mark.parametrize("n", [1, 2, 7, 1000, BAND_MIN_SIZE + 1001])
def test_masker_matches_the_sort_oracle(masker, dtype, kind, n):
    values = _values(kind, n, dtype, seed=n + len(kind))
    hint = ThresholdHint()
    for kept in _kept_cases(n):
        expected = sort_oracle(values, kept)
        for _ in range(2):  # the numpy masker's second call starts from the hint the first one left
            got = topk_mask(values, kept, hint, masker=masker)
            assert got.dtype == torch.bool and got.shape == values.shape
            assert torch.equal(got, expected), (kept, masker)


@pytest.mark.parametrize("masker", MASKERS)
def test_masker_on_a_layer_of_millions(masker):
    n = 2_000_000
    gen = torch.Generator().manual_seed(3)
    values = torch.randint(0, 50_000, (n,), generator=gen).float()  # ~60 ties per value
    for kept in (1, kept_count(n, 0.3), n - 1):
        assert torch.equal(topk_mask(values, kept, masker=masker), sort_oracle(values, kept)), kept


@pytest.mark.parametrize("masker", MASKERS)
def test_masker_keeps_the_shape_of_a_conv_weight_and_of_views(masker):
    values = torch.randint(0, 5, (8, 3, 3, 3), generator=torch.Generator().manual_seed(4)).float()
    view = values.permute(1, 0, 2, 3)  # non-contiguous: its own flat C order counts
    for kept in (1, 100, 215):
        assert torch.equal(topk_mask(values, kept, masker=masker), sort_oracle(values, kept))
        assert torch.equal(topk_mask(view, kept, masker=masker), sort_oracle(view.contiguous(), kept))


def test_auto_masker_follows_the_device():
    assert resolve_masker(None, torch.device("cpu")) == "numpy"
    assert resolve_masker("auto", torch.device("cpu")) == "numpy"
    assert resolve_masker(None, torch.device("cuda")) == "torch"
    assert resolve_masker("numpy", torch.device("cuda")) == "numpy"
    assert resolve_masker("torch", torch.device("cpu")) == "torch"


def test_unknown_masker_is_one_clear_error():
    expected = "unknown masker 'cupy'; choose from: auto, numpy, torch"
    with pytest.raises(MaskforgeError) as caught:
        topk_mask(torch.rand(10), 3, masker="cupy")
    assert str(caught.value) == expected
    model = nn.Sequential(MaskedLinear(4, 3, k=0.5))
    with pytest.raises(MaskforgeError) as caught:
        set_masker(model, "cupy")
    assert str(caught.value) == expected
    assert model[0].masker is None  # nothing changed


# ---------------------------------------------------------------------------------------------------------
# Both maskers in layers: identical masks, forward bits and score-gradient bits
# ---------------------------------------------------------------------------------------------------------


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits, so -0.0 and +0.0 (or two NaNs) compare as what they are."""
    return t.detach().contiguous().view(torch.int32)


def _tiny_model(seed: int, k: float) -> nn.Module:
    model = nn.Sequential(
        MaskedConv2d(2, 6, 3, padding=1, k=k),
        NonAffineBatchNorm2d(6),
        nn.ReLU(),
        nn.Flatten(),
        MaskedLinear(6 * 5 * 5, 4, k=k),
    )
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in masked_modules(model).values():
            layer.weight.copy_(torch.randn(layer.weight.shape, generator=gen))
            # few levels and both signs: ties at the threshold and zero scores (sign 0) on purpose
            layer.scores.copy_(torch.randint(-4, 5, layer.scores.shape, generator=gen).float() * 0.125)
    return model


@pytest.mark.parametrize("k", [0.01, 0.5, 0.99])
def test_both_maskers_train_bit_identically(k):
    """Three SGD steps from one start: masks, logits, score gradients, scores and BN statistics match bit
    for bit, and every mask is the oracle's."""
    models = {name: _tiny_model(7, k) for name in MASKERS}
    for name, model in models.items():
        set_masker(model, name)
    optimizers = {name: torch.optim.SGD(m.parameters(), lr=0.5, momentum=0.9) for name, m in models.items()}
    gen = torch.Generator().manual_seed(8)
    for _ in range(3):
        x, y = torch.randn(8, 2, 5, 5, generator=gen), torch.randint(0, 4, (8,), generator=gen)
        outs, grads = {}, {}
        for name, model in models.items():
            optimizers[name].zero_grad()
            outs[name] = model(x)
            F.cross_entropy(outs[name], y).backward()
            grads[name] = [layer.scores.grad.clone() for layer in masked_modules(model).values()]
            optimizers[name].step()
        assert torch.equal(_bits(outs["numpy"]), _bits(outs["torch"]))
        for a, b in zip(grads["numpy"], grads["torch"]):
            assert torch.equal(_bits(a), _bits(b))
    layers = {name: list(masked_modules(m).values()) for name, m in models.items()}
    for a, b in zip(layers["numpy"], layers["torch"]):
        assert torch.equal(_bits(a.scores), _bits(b.scores))
        assert torch.equal(a.mask(), b.mask())
        assert torch.equal(a.mask(), sort_oracle(a.scores.detach().abs(), a.kept))
        with torch.no_grad():
            assert torch.equal(_bits(a.effective_weight()), _bits(b.effective_weight()))
    assert torch.equal(models["numpy"][1].running_var, models["torch"][1].running_var)


@pytest.mark.parametrize("masker", MASKERS)
def test_each_masker_gives_the_dense_autograd_gradient(masker):
    layer = MaskedLinear(30, 9, k=0.4)
    layer.masker = masker
    gen = torch.Generator().manual_seed(9)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(layer.weight.shape, generator=gen))
        layer.scores.copy_(torch.randint(-3, 4, layer.scores.shape, generator=gen).float())
    x, g = torch.randn(5, 30, generator=gen), torch.randn(5, 9, generator=gen)
    (layer(x) * g).sum().backward()
    w, s = layer.weight, layer.scores.detach()
    w_eff = (w * sort_oracle(s.abs(), layer.kept)).requires_grad_(True)
    (F.linear(x, w_eff) * g).sum().backward()
    torch.testing.assert_close(layer.scores.grad, w_eff.grad * w * torch.sign(s), rtol=0, atol=0)


@pytest.mark.parametrize("masker", MASKERS)
def test_masker_switch_takes_effect_and_numpy_on_a_large_layer_keeps_the_hint_honest(masker):
    layer = MaskedLinear(400, 100, k=0.3)  # 40,000 weights: the numpy masker uses its band hint
    gen = torch.Generator().manual_seed(10)
    with torch.no_grad():
        layer.scores.copy_(torch.randn(layer.scores.shape, generator=gen))
    set_masker(nn.Sequential(layer), masker)
    for _ in range(4):
        with torch.no_grad():
            layer.scores.add_(torch.randn(layer.scores.shape, generator=gen) * 1e-3)
        assert torch.equal(layer.mask(), sort_oracle(layer.scores.detach().abs(), layer.kept))


@pytest.mark.parametrize("masker", [*MASKERS, None])
def test_compiled_model_matches_eager(masker):
    """Under torch.compile (dynamo + AOT autograd, no C++ toolchain needed): the torch masker is traced,
    the numpy one runs eagerly at a graph break; forward and score gradients equal eager execution."""
    eager, compiled_source = _tiny_model(11, 0.4), _tiny_model(11, 0.4)
    for model in (eager, compiled_source):
        set_masker(model, masker)
    compiled = torch.compile(compiled_source, backend="aot_eager")
    x = torch.randn(4, 2, 5, 5, generator=torch.Generator().manual_seed(12))
    torch._dynamo.reset()
    out_eager, out_compiled = eager(x), compiled(x)
    out_eager.square().sum().backward()
    out_compiled.square().sum().backward()
    torch.testing.assert_close(out_compiled, out_eager, rtol=0, atol=0)
    for a, b in zip(masked_modules(eager).values(), masked_modules(compiled_source).values()):
        torch.testing.assert_close(b.scores.grad, a.scores.grad, rtol=0, atol=0)
        assert torch.equal(b.mask(), a.mask())

"""Tests for maskforge.archs: every registered architecture builds, runs forward and backward, trains only
its scores, and computes what a dense network built independently (by hand or by torchvision) computes."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from maskforge import regen
from maskforge.archs import ARCHS, arch_args, arch_names, build_structure, create_model, list_archs
from maskforge.errors import MaskforgeError
from maskforge.layers import MaskedConv2d, MaskedLinear, batchnorm_modules, masked_modules

SMALL_NETS = ["fc", "conv2", "conv4", "conv6", "conv8"]
RESNETS = {  # arch -> torchvision constructor (the independent reference)
    "resnet18": torchvision.models.resnet18,
    "resnet34": torchvision.models.resnet34,
    "resnet50": torchvision.models.resnet50,
    "resnet101": torchvision.models.resnet101,
    "resnet152": torchvision.models.resnet152,
    "wrn50": torchvision.models.wide_resnet50_2,
    "wrn101": torchvision.models.wide_resnet101_2,
}
HEAVY = {"resnet34", "resnet50", "resnet101", "resnet152", "wrn50", "wrn101"}


def test_registry_holds_the_paper_networks():
    assert set(arch_names()) == set(SMALL_NETS) | set(RESNETS)
    assert list(ARCHS) == arch_names()
    for name, entry in ARCHS.items():
        assert entry.name == name and entry.description


# ---------------------------------------------------------------------------------------------------------
# Forward + backward of every architecture
# ---------------------------------------------------------------------------------------------------------


def _check_forward_backward(model: nn.Module, x: torch.Tensor, num_classes: int) -> None:
    model.train()
    tracked = {name: bn.num_batches_tracked.item() for name, bn in batchnorm_modules(model).items()}
    out = model(x)
    assert out.shape == (x.shape[0], num_classes)
    assert torch.isfinite(out).all()
    F.cross_entropy(out, torch.arange(x.shape[0]) % num_classes).backward()
    params = dict(model.named_parameters())
    assert params and all(name.endswith("scores") for name in params)
    assert len(params) == len(masked_modules(model))
    for name, p in params.items():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert any(p.grad.abs().sum() > 0 for p in params.values())
    for name, buffer in model.named_buffers():
        assert not buffer.requires_grad and buffer.grad is None, name
    for name, bn in batchnorm_modules(model).items():
        assert not bn.affine and bn.weight is None and bn.bias is None, name
        assert bn.track_running_stats and bn.running_mean is not None, name
        assert bn.num_batches_tracked.item() == tracked[name] + 1, name
    # Every conv / linear is masked (nothing dense slipped through)
    for name, module in model.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            assert isinstance(module, (MaskedConv2d, MaskedLinear)), name
            assert module.bias is None, name


@pytest.mark.parametrize("arch,side", [("fc", 28), ("conv2", 28), ("conv4", 28), ("conv6", 16), ("conv8", 16)])
def test_small_nets_forward_backward(arch, side):
    model = create_model(arch, in_channels=1, num_classes=10, image_size=(side, side), k=0.5, seed=1)
    _check_forward_backward(model, torch.randn(3, 1, side, side), 10)


def test_small_net_on_color_nonsquare_input():
    model = create_model("conv4", in_channels=3, num_classes=4, image_size=(16, 24), k=0.3)
    _check_forward_backward(model, torch.randn(2, 3, 16, 24), 4)


@pytest.fixture(scope="module")
def resnet18_small():
    """One ResNet-18 at 3x16x16 (CIFAR stem) shared by the tests below: building it is the slow part."""
    return create_model("resnet18", in_channels=3, num_classes=3, image_size=(16, 16), k=0.5, seed=6)


def test_resnet_forward_backward(resnet18_small):
    model = resnet18_small
    for p in model.parameters():
        p.grad = None
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert isinstance(model.maxpool, nn.Identity)
    _check_forward_backward(model, torch.randn(2, 3, 16, 16), 3)


@pytest.mark.slow
@pytest.mark.parametrize("arch", sorted(HEAVY))
def test_heavy_resnet_forward_backward(arch):
    model = create_model(arch, in_channels=3, num_classes=3, image_size=(16, 16), k=0.5)
    assert model.conv1.kernel_size == (3, 3) and isinstance(model.maxpool, nn.Identity)
    _check_forward_backward(model, torch.randn(2, 3, 16, 16), 3)


@pytest.mark.parametrize("arch", sorted(RESNETS))
def test_resnet_structure_matches_torchvision(arch):
    """Cheap for every size (meta device): each torchvision conv/linear/BN has a masked/non-affine twin."""
    sizes = (((16, 16), (3, 1, 1)), ((72, 72), (7, 2, 3)))
    if arch not in ("resnet18", "resnet50"):  # the stem swap is shared code: both stems on one of each block
        sizes = sizes[:1]
    for size, stem in sizes:
        with torch.device("meta"):
            ours = build_structure(arch, arch_args(3, 7, size), 0.5)
            ref = RESNETS[arch](num_classes=7)
        ref_convs = {
            n: tuple(m.weight.shape)
            for n, m in ref.named_modules()
            if isinstance(m, (nn.Conv2d, nn.Linear)) and n != "conv1"
        }
        our_convs = {n: tuple(m.weight.shape) for n, m in masked_modules(ours).items() if n != "conv1"}
        assert our_convs == ref_convs
        assert tuple(ours.conv1.weight.shape) == (64, 3, stem[0], stem[0])
        assert ours.conv1.stride == (stem[1], stem[1]) and ours.conv1.padding == (stem[2], stem[2])
        assert isinstance(ours.maxpool, nn.Identity) == (stem[0] == 3)
        ref_bns = {n: m.num_features for n, m in ref.named_modules() if isinstance(m, nn.BatchNorm2d)}
        our_bns = batchnorm_modules(ours)
        assert {n: m.num_features for n, m in our_bns.items()} == ref_bns
        assert all(not m.affine and m.track_running_stats for m in our_bns.values())
        assert all(n.endswith("scores") for n, _ in ours.named_parameters())


# ---------------------------------------------------------------------------------------------------------
# Same function as an independently built dense network with the masked weights baked in
# ---------------------------------------------------------------------------------------------------------


def _effective(layer) -> torch.Tensor:
    with torch.no_grad():
        return layer.weight * layer.mask()


def _dense_convnet(widths, in_ch, num_classes, size):
    """The paper's Conv-n: per stage two 3x3 convs (padding 1) + ReLU, then 2x2 max-pool; FC 256-256-C."""
    layers, ch = [], in_ch
    for w in widths:
        layers += [
            nn.Conv2d(ch, w, 3, padding=1, bias=False),
            nn.ReLU(),
            nn.Conv2d(w, w, 3, padding=1, bias=False),
            nn.ReLU(),
            nn.MaxPool2d(2),
        ]
        ch = w
    h, wd = size[0] // 2 ** len(widths), size[1] // 2 ** len(widths)
    layers += [
        nn.Flatten(),
        nn.Linear(ch * h * wd, 256, bias=False),
        nn.ReLU(),
        nn.Linear(256, 256, bias=False),
        nn.ReLU(),
        nn.Linear(256, num_classes, bias=False),
    ]
    return nn.Sequential(*layers)


def _load_dense(dense: nn.Module, masked: nn.Module) -> None:
    dense_layers = [m for m in dense.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    masked_layers = list(masked_modules(masked).values())
    assert len(dense_layers) == len(masked_layers)
    with torch.no_grad():
        for d, m in zip(dense_layers, masked_layers):
            d.weight.copy_(_effective(m))


@pytest.mark.parametrize(
    "arch,widths,size", [("conv2", [64], (28, 28)), ("conv4", [64, 128], (20, 12)), ("conv6", [64, 128, 256], (8, 8))]
)
def test_convnets_equal_a_dense_reimplementation(arch, widths, size):
    model = create_model(arch, in_channels=2, num_classes=5, image_size=size, k=0.3, seed=4).eval()
    dense = _dense_convnet(widths, 2, 5, size).eval()
    _load_dense(dense, model)
    x = torch.randn(3, 2, *size)
    with torch.no_grad():
        torch.testing.assert_close(model(x), dense(x), rtol=1e-5, atol=1e-6)


def test_fc_is_lenet_300_100():
    model = create_model("fc", in_channels=3, num_classes=4, image_size=(5, 6), k=0.5, seed=2).eval()
    shapes = [tuple(m.weight.shape) for m in masked_modules(model).values()]
    assert shapes == [(300, 90), (100, 300), (4, 100)]
    w = [_effective(m) for m in masked_modules(model).values()]
    x = torch.randn(4, 3, 5, 6)
    ref = F.relu(x.reshape(4, -1) @ w[0].t())
    ref = F.relu(ref @ w[1].t()) @ w[2].t()
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("size", [(16, 16), (72, 72)])
def test_resnet18_equals_torchvision_with_masked_weights(size, resnet18_small):
    """The ImageNet stem (7x7/2 + max-pool) above 64 px, the CIFAR stem (3x3/1, no pool) at or below."""
    if size == (16, 16):
        model = resnet18_small
    else:
        model = create_model("resnet18", in_channels=3, num_classes=3, image_size=size, k=0.5, seed=6)
        assert model.conv1.kernel_size == (7, 7) and isinstance(model.maxpool, nn.MaxPool2d)
    with torch.device("meta"):  # every tensor of the dense twin is overwritten below: skip its random init
        dense = torchvision.models.resnet18(num_classes=3)
        if max(size) <= 64:
            dense.conv1 = nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)
            dense.maxpool = nn.Identity()
    dense = dense.to_empty(device="cpu")
    _load_dense(dense, model)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        dense.fc.bias.zero_()
        for ours, theirs in zip(
            batchnorm_modules(model).values(), [m for m in dense.modules() if isinstance(m, nn.BatchNorm2d)]
        ):
            theirs.weight.fill_(1.0)
            theirs.bias.zero_()
            theirs.num_batches_tracked.zero_()
            mean = torch.randn(ours.num_features, generator=gen) * 0.1
            var = torch.rand(ours.num_features, generator=gen) + 0.5
            for bn in (ours, theirs):
                bn.running_mean.copy_(mean)
                bn.running_var.copy_(var)
    x = torch.randn(2, 3, *size, generator=gen)
    with torch.no_grad():
        model.eval(), dense.eval()
        torch.testing.assert_close(model(x), dense(x), rtol=1e-4, atol=1e-5)
        model.train(), dense.train()  # batch statistics path, and running stats update the same way
        torch.testing.assert_close(model(x), dense(x), rtol=1e-4, atol=1e-5)
    for ours, theirs in zip(
        batchnorm_modules(model).values(), [m for m in dense.modules() if isinstance(m, nn.BatchNorm2d)]
    ):
        torch.testing.assert_close(ours.running_mean, theirs.running_mean)
        torch.testing.assert_close(ours.running_var, theirs.running_var)


# ---------------------------------------------------------------------------------------------------------
# Seeded weights and scores
# ---------------------------------------------------------------------------------------------------------


def test_create_model_fills_weights_and_scores_from_the_seed():
    model = create_model(
        "conv2", in_channels=1, num_classes=10, image_size=(8, 8), k=0.5, seed=3, init="signed_constant", scale_fan=True
    )
    for name, layer in masked_modules(model).items():
        shape = tuple(layer.weight.shape)
        fan = math.prod(shape[1:])
        sigma = torch.tensor(math.sqrt(2.0 / (0.5 * fan)), dtype=torch.float32)
        assert torch.equal(layer.weight.abs(), sigma.expand(shape))
        assert (
            layer.weight.numpy().tobytes()
            == regen.generate(3, f"{name}.weight", shape, "signed_constant", k=0.5, scale_fan=True).tobytes()
        )
        bound = 1.0 / math.sqrt(fan)
        assert layer.scores.abs().max() <= bound and layer.scores.std() > bound / 3
        assert layer.k == 0.5
    again = create_model(
        "conv2", in_channels=1, num_classes=10, image_size=(8, 8), k=0.5, seed=3, init="signed_constant", scale_fan=True
    )
    other = create_model("conv2", in_channels=1, num_classes=10, image_size=(8, 8), k=0.5, seed=4)
    for (n, a), b, c in zip(model.named_parameters(), again.parameters(), other.parameters()):
        assert torch.equal(a, b) and not torch.equal(a, c), n


def test_none_kwargs_are_dropped_and_unknown_ones_rejected():
    model = create_model("fc", image_size=(4, 4), num_classes=2, pretrained=None)
    assert tuple(masked_modules(model)["5"].weight.shape) == (2, 100)
    with pytest.raises(MaskforgeError, match="pretrained"):
        create_model("fc", image_size=(4, 4), pretrained=True)


def test_bad_arguments():
    with pytest.raises(MaskforgeError) as info:
        create_model("resnet9000")
    message = str(info.value)
    assert "resnet9000" in message and all(name in message for name in arch_names())
    with pytest.raises(MaskforgeError, match="too small"):
        create_model("conv8", image_size=(8, 8))
    create_model("conv8", image_size=(16, 16))  # the smallest that works: 16 >> 4 == 1
    with pytest.raises(MaskforgeError, match="too small"):
        create_model("conv8", image_size=(16, 15))
    for k in (0.0, -0.1, 1.5):
        with pytest.raises(MaskforgeError, match="k must be"):
            create_model("fc", k=k)
    with pytest.raises(MaskforgeError, match="distribution"):
        create_model("fc", init="xavier")
    with pytest.raises(MaskforgeError, match="bad arguments"):
        build_structure("fc", {"in_channels": 1}, 0.5)


# ---------------------------------------------------------------------------------------------------------
# Weight counts in `list_archs` vs independent counts
# ---------------------------------------------------------------------------------------------------------


def _torchvision_count(constructor, num_classes: int, cifar_stem: bool) -> int:
    with torch.device("meta"):
        model = constructor(num_classes=num_classes)
    total = sum(m.weight.numel() for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    if cifar_stem:
        total += 3 * 64 * 3 * 3 - model.conv1.weight.numel()
    return total


def _convnet_count(widths, in_ch, num_classes, side) -> int:
    total, ch = 0, in_ch
    for w in widths:
        total += ch * w * 9 + w * w * 9
        ch = w
    flat = ch * (side // 2 ** len(widths)) ** 2
    return total + flat * 256 + 256 * 256 + 256 * num_classes


def test_list_archs_counts_are_independent_counts():
    entries = {e["name"]: e for e in list_archs()}
    assert list(entries) == arch_names()
    for name, constructor in RESNETS.items():
        assert entries[name]["weights_imagenet"] == _torchvision_count(constructor, 1000, cifar_stem=False), name
        assert entries[name]["weights_cifar10"] == _torchvision_count(constructor, 10, cifar_stem=True), name
    widths = {"conv2": [64], "conv4": [64, 128], "conv6": [64, 128, 256], "conv8": [64, 128, 256, 512]}
    for name, w in widths.items():
        assert entries[name]["weights_cifar10"] == _convnet_count(w, 3, 10, 32)
        assert entries[name]["weights_imagenet"] == _convnet_count(w, 3, 1000, 224)
    assert entries["fc"]["weights_cifar10"] == 3072 * 300 + 300 * 100 + 100 * 10
    assert entries["fc"]["weights_imagenet"] == 3 * 224 * 224 * 300 + 300 * 100 + 100 * 1000
    # the design note's headline number: WRN-50-2 has ~68.9 M masked weights at ImageNet shape
    assert 68_000_000 < entries["wrn50"]["weights_imagenet"] < 69_000_000
    for entry in entries.values():
        assert isinstance(entry["description"], str) and entry["description"]


# ---------------------------------------------------------------------------------------------------------
# Width multiplier: hidden widths x W (round half to even, at least 1); inputs and classes stay
# ---------------------------------------------------------------------------------------------------------


def _expected_conv_shapes(stage_widths, hidden, in_ch, num_classes, size):
    """The layer shapes of a Conv-n with the given (already multiplied) widths, written out by hand."""
    shapes, ch = [], in_ch
    for w in stage_widths:
        shapes += [(w, ch, 3, 3), (w, w, 3, 3)]
        ch = w
    flat = ch * (size[0] // 2 ** len(stage_widths)) * (size[1] // 2 ** len(stage_widths))
    return shapes + [(hidden, flat), (hidden, hidden), (num_classes, hidden)]


@pytest.mark.parametrize(
    "arch,width,stages,hidden",
    [
        ("conv4", 0.5, [32, 64], 128),
        ("conv4", 2.0, [128, 256], 512),
        ("conv2", 1.5, [96], 384),
        ("conv6", 0.25, [16, 32, 64], 64),
        ("conv8", 0.125, [8, 16, 32, 64], 32),
    ],
)
def test_conv_width_shapes(arch, width, stages, hidden):
    with torch.device("meta"):
        model = build_structure(arch, arch_args(3, 7, (16, 16), width), 0.5)
    shapes = [tuple(m.weight.shape) for m in masked_modules(model).values()]
    assert shapes == _expected_conv_shapes(stages, hidden, 3, 7, (16, 16))


@pytest.mark.parametrize(
    "width,hidden",
    [
        (2.0, (600, 200)),
        (0.5, (150, 50)),
        # 300 * 0.29 = 86.99999999999999 in binary64: rounds to 87, not 86
        (0.29, (87, 29)),
        (0.001, (1, 1)),
        (0.005, (2, 1)),  # 1.5 -> 2, 0.5 -> 0 -> 1
        (1 / 3, (100, 33)),
    ],
)
def test_fc_width_shapes_and_rounding(width, hidden):
    model = create_model("fc", in_channels=2, num_classes=5, image_size=(4, 3), width=width, seed=1)
    shapes = [tuple(m.weight.shape) for m in masked_modules(model).values()]
    assert shapes == [(hidden[0], 24), (hidden[1], hidden[0]), (5, hidden[1])]


def test_width_is_recorded_only_when_not_one():
    assert arch_args(1, 10, (28, 28)) == {"in_channels": 1, "num_classes": 10, "image_size": [28, 28]}
    assert arch_args(1, 10, (28, 28), 1) == {"in_channels": 1, "num_classes": 10, "image_size": [28, 28]}
    assert arch_args(1, 10, (28, 28), 2) == {"in_channels": 1, "num_classes": 10, "image_size": [28, 28], "width": 2.0}
    # the width-1 network is the one built before the width multiplier existed (same names and shapes)
    plain = create_model("conv2", in_channels=1, num_classes=3, image_size=(8, 8), seed=2)
    ones = create_model("conv2", in_channels=1, num_classes=3, image_size=(8, 8), seed=2, width=1.0)
    assert [(n, tuple(p.shape)) for n, p in plain.named_parameters()] == [
        ("features.0.scores", (64, 1, 3, 3)),
        ("features.2.scores", (64, 64, 3, 3)),
        ("classifier.1.scores", (256, 64 * 16)),
        ("classifier.3.scores", (256, 256)),
        ("classifier.5.scores", (3, 256)),
    ]
    for a, b in zip(plain.parameters(), ones.parameters()):
        assert torch.equal(a, b)


def test_bad_widths_are_refused():
    for width in (0, -1.0, float("nan"), float("inf"), True, "2", 65):
        with pytest.raises(MaskforgeError, match=r"^width must be a number in \(0, 64\]"):
            arch_args(1, 10, (28, 28), width)
    for arch in RESNETS:
        with pytest.raises(MaskforgeError, match=f"architecture {arch} has fixed widths"):
            build_structure(arch, {"in_channels": 3, "num_classes": 10, "image_size": [32, 32], "width": 2.0}, 0.5)
    with pytest.raises(MaskforgeError, match=r"^width must be a number"):
        build_structure("fc", {"in_channels": 3, "num_classes": 10, "image_size": [8, 8], "width": 0}, 0.5)


def test_widened_network_forward_backward():
    model = create_model("conv4", in_channels=1, num_classes=10, image_size=(12, 12), k=0.3, seed=1, width=0.75)
    _check_forward_backward(model, torch.randn(2, 1, 12, 12), 10)


# ---------------------------------------------------------------------------------------------------------
# Weight counts without building (what `maskforge archs` shows) against real builds
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_counts_without_building_equal_a_real_build(arch):
    from maskforge.archs import count_masked_weights

    # both sides of the 64-px stem switch (3x32x32 and 3x224x224 are checked against torchvision above)
    cases = [(1, 7, (64, 64)), (2, 1000, (65, 40))]
    if ARCHS[arch].widens:
        cases = [(3, 10, (32, 32)), (1, 7, (20, 36)), (2, 1000, (65, 40))]
        cases += [(3, 10, (32, 32), w) for w in (0.5, 2.0, 0.29)]
    for in_ch, classes, size, *width in cases:
        args = arch_args(in_ch, classes, size, *width)
        with torch.device("meta"):
            model = build_structure(arch, args, 0.5)
        built = sum(layer.weight.numel() for layer in masked_modules(model).values())
        assert count_masked_weights(arch, args) == built, (arch, args)


def test_list_archs_builds_nothing(monkeypatch):
    """`maskforge archs` answers from arithmetic: no torchvision (seconds to import), no network is built."""
    import sys

    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")] + ["torchvision"]:
        monkeypatch.setitem(sys.modules, name, None)  # any import of torchvision now raises ImportError
    monkeypatch.setattr(nn.Module, "__init__", lambda *a, **k: pytest.fail("list_archs built a module"))
    entries = list_archs()
    assert [entry["name"] for entry in entries] == arch_names()


def test_an_architecture_registered_without_a_counter_is_counted_by_building_it():
    from maskforge.archs import count_masked_weights, register_arch

    def tiny(in_channels, num_classes, image_size, k=0.5):
        return nn.Sequential(
            MaskedConv2d(in_channels, 5, 3, k=k),
            nn.Flatten(),
            MaskedLinear(5 * (image_size[0] - 2) * (image_size[1] - 2), num_classes, k=k),
        )

    register_arch("tiny-test", "test only")(tiny)
    try:
        assert count_masked_weights("tiny-test", arch_args(2, 3, (6, 7))) == 2 * 5 * 9 + 5 * 4 * 5 * 3
        assert tuple(
            create_model("tiny-test", in_channels=2, num_classes=3, image_size=(6, 7)).state_dict()["2.scores"].shape
        ) == (3, 100)
        with pytest.raises(MaskforgeError, match="architecture tiny-test has fixed widths"):
            build_structure("tiny-test", arch_args(2, 3, (6, 7), 2.0), 0.5)
    finally:
        ARCHS.pop("tiny-test")


def test_archs_command_imports_no_torch():
    """`maskforge archs` answers from the torch-free registry: torch (1.5 s to import) and numpy are never
    loaded (python -X importtime lists every module a process imports), and it prints the library's listing."""
    import json
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "maskforge.cli", "archs", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    imported = {line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")}
    assert "maskforge.registry" in imported and "typer" in imported  # the listing is complete
    assert not imported & {"torch", "numpy", "torchvision", "maskforge.archs"}
    assert [json.loads(line) for line in done.stdout.splitlines()] == list_archs()

"""Architecture registry: a plain dict filled by a decorator, and `create_model` to build a seeded network.

Every architecture is a function `(in_channels, num_classes, image_size, k=..., width=...) -> nn.Module`
built from the masked layers of `layers.py`, registered with a function that counts its masked weights
from the arguments alone (so `maskforge archs` answers without building anything). `create_model` then
fills every weight from the portable generator and every score from its own stream, so a network is
fully described by (arch, arch args, seed, init, k).

Width multiplier (`width`, the paper's figures 4 and 5): every hidden layer of the conv and fc networks
gets `max(1, round_half_even(w * width))` units (a binary64 product, Python's `round`), where `w` is the
paper's width (64/128/256/512 channels, the 256-unit FC layers, LeNet's 300 and 100); the input and the
classes stay. The ResNets keep torchvision's widths (wrn50/wrn101 are the wide ones): `width` other than 1
is refused for them. `arch.args` records `width` only when it is not 1, so width-1 artifacts are
unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn as nn

from . import regen
from .errors import MaskforgeError
from .layers import MaskedConv2d, MaskedLinear, NonAffineBatchNorm2d, masked_modules

SMALL_IMAGE_MAX_SIDE = 64  # at or below this, ResNets use the CIFAR stem (3x3 conv, stride 1, no max-pool)
MAX_WIDTH = 64.0           # the largest width multiplier accepted (a bound for untrusted artifacts)


@dataclass(frozen=True)
class ArchEntry:
    name: str
    builder: Callable[..., nn.Module]
    description: str
    count: Callable[..., int] | None = None  # (in_channels, num_classes, image_size, width) -> masked weights
    widens: bool = False               # whether the builder takes `width` (other than 1)


ARCHS: dict[str, ArchEntry] = {}


def register_arch(name: str, description: str, count: Callable[..., int] | None = None,
                  widens: bool = False) -> Callable:
    """Decorator: add an architecture builder to the registry under `name`.

    `count(in_channels, num_classes, image_size, width)` gives its masked weights without building it
    (without one, counting builds the network on the meta device); `widens`: the builder takes `width`.
    """

    def decorator(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        ARCHS[name] = ArchEntry(name, builder, description, count, widens)
        return builder

    return decorator


def arch_names() -> list[str]:
    return list(ARCHS)


def get_arch(name: str) -> ArchEntry:
    if name not in ARCHS:
        raise MaskforgeError(f"unknown architecture {name!r}; choose from: {', '.join(ARCHS)}")
    return ARCHS[name]


def scaled_width(units: int, width: float) -> int:
    """The paper's `units` times the width multiplier: max(1, round half to even of units * width)."""
    return max(1, round(units * float(width)))


def check_width(width, arch: str | None = None) -> float:
    """`width` as a float, or a MaskforgeError naming the field (and the architecture that refuses it)."""
    if isinstance(width, bool) or not isinstance(width, (int, float)) or not math.isfinite(width) \
            or not 0.0 < width <= MAX_WIDTH:
        raise MaskforgeError(f"width must be a number in (0, {MAX_WIDTH:g}] (the width multiplier), got {width!r}")
    if arch is not None and width != 1 and not get_arch(arch).widens:
        widening = ", ".join(name for name, entry in ARCHS.items() if entry.widens)
        raise MaskforgeError(f"width {width:g}: architecture {arch} has fixed widths (width must be 1); the "
                             f"width multiplier applies to {widening} (wrn50/wrn101 are the wide ResNets)")
    return float(width)


# --- the paper's small networks (Table 1; no batch norm, as in the reference code) ------------------

FC_HIDDEN = (300, 100)        # LeNet 300-100
CONV_FC_HIDDEN = (256, 256)   # the FC head of Conv-2/4/6/8
_CONV_WIDTHS = {"conv2": [64], "conv4": [64, 128], "conv6": [64, 128, 256], "conv8": [64, 128, 256, 512]}


def _pooled_size(image_size: tuple[int, int], stages: int) -> tuple[int, int]:
    height, width = image_size[0] >> stages, image_size[1] >> stages
    if height < 1 or width < 1:
        raise MaskforgeError(f"images of {image_size[0]}x{image_size[1]} are too small for {stages} "
                             f"pooling stages (need at least {2 ** stages}x{2 ** stages})")
    return height, width


def _conv_stack(widths: list[int], in_channels: int, k: float) -> tuple[nn.Sequential, int]:
    layers: list[nn.Module] = []
    channels = in_channels
    for stage_width in widths:
        for _ in range(2):
            layers += [MaskedConv2d(channels, stage_width, 3, padding=1, k=k), nn.ReLU(inplace=True)]
            channels = stage_width
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers), channels


def _mlp(sizes: list[int], k: float) -> list[nn.Module]:
    """MaskedLinear layers between consecutive `sizes`, with a ReLU after every one but the last."""
    layers: list[nn.Module] = []
    for index, (inputs, outputs) in enumerate(zip(sizes, sizes[1:])):
        layers.append(MaskedLinear(inputs, outputs, k=k))
        if index < len(sizes) - 2:
            layers.append(nn.ReLU(inplace=True))
    return layers


class ConvNet(nn.Module):
    """The paper's Conv-2/4/6/8: pairs of 3x3 convs each followed by a 2x2 max-pool, then FC 256-256-C."""

    def __init__(self, widths: list[int], in_channels: int, num_classes: int, image_size: tuple[int, int],
                 k: float = 0.5, width: float = 1.0) -> None:
        super().__init__()
        height, side = _pooled_size(image_size, len(widths))
        self.features, channels = _conv_stack([scaled_width(w, width) for w in widths], in_channels, k)
        hidden = [scaled_width(units, width) for units in CONV_FC_HIDDEN]
        self.classifier = nn.Sequential(nn.Flatten(),
                                        *_mlp([channels * height * side, *hidden, num_classes], k))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def _mlp_count(sizes: list[int]) -> int:
    return sum(a * b for a, b in zip(sizes, sizes[1:]))


def _count_fc(in_channels: int, num_classes: int, image_size: tuple[int, int], width: float = 1.0) -> int:
    inputs = in_channels * image_size[0] * image_size[1]
    return _mlp_count([inputs, *(scaled_width(units, width) for units in FC_HIDDEN), num_classes])


@register_arch("fc", "LeNet 300-100 MLP (paper section 4.2), sized to the input", _count_fc, widens=True)
def fc(in_channels: int, num_classes: int, image_size: tuple[int, int], k: float = 0.5,
       width: float = 1.0) -> nn.Module:
    inputs = in_channels * image_size[0] * image_size[1]
    hidden = [scaled_width(units, width) for units in FC_HIDDEN]
    return nn.Sequential(nn.Flatten(), *_mlp([inputs, *hidden, num_classes], k))


def _convnet_counter(widths: list[int]) -> Callable[..., int]:
    def count(in_channels: int, num_classes: int, image_size: tuple[int, int], width: float = 1.0) -> int:
        height, side = _pooled_size(image_size, len(widths))
        total, channels = 0, in_channels
        for stage_width in (scaled_width(w, width) for w in widths):
            total += 9 * (channels * stage_width + stage_width * stage_width)
            channels = stage_width
        hidden = [scaled_width(units, width) for units in CONV_FC_HIDDEN]
        return total + _mlp_count([channels * height * side, *hidden, num_classes])

    return count


def _convnet_builder(widths: list[int]) -> Callable[..., nn.Module]:
    def build(in_channels: int, num_classes: int, image_size: tuple[int, int], k: float = 0.5,
              width: float = 1.0) -> nn.Module:
        return ConvNet(widths, in_channels, num_classes, image_size, k, width)

    return build


for _name, _widths in _CONV_WIDTHS.items():
    register_arch(_name, f"the paper's {_name[:4].capitalize()}-{_name[4:]}: {len(_widths) * 2} 3x3 convs "
                         f"({'/'.join(map(str, _widths))} wide) + FC 256-256",
                  _convnet_counter(_widths), widens=True)(_convnet_builder(_widths))


# --- torchvision ResNets with every conv/linear masked and every BN non-affine ------------------------

@dataclass(frozen=True)
class ResNetSpec:
    """torchvision's ResNet(block, layers, width_per_group=...) arguments, as plain data."""

    label: str
    bottleneck: bool
    layers: tuple[int, int, int, int]
    width_per_group: int = 64


RESNETS = {
    "resnet18": ResNetSpec("ResNet-18", False, (2, 2, 2, 2)),
    "resnet34": ResNetSpec("ResNet-34", False, (3, 4, 6, 3)),
    "resnet50": ResNetSpec("ResNet-50", True, (3, 4, 6, 3)),
    "resnet101": ResNetSpec("ResNet-101", True, (3, 4, 23, 3)),
    "resnet152": ResNetSpec("ResNet-152", True, (3, 8, 36, 3)),
    "wrn50": ResNetSpec("Wide ResNet-50-2", True, (3, 4, 6, 3), 128),
    "wrn101": ResNetSpec("Wide ResNet-101-2", True, (3, 4, 23, 3), 128),
}


def _swap_layers(model: nn.Module, k: float) -> nn.Module:
    """Replace (in place) each Conv2d/Linear with its masked twin and each BatchNorm2d with a non-affine one."""
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Conv2d):
            new: nn.Module = MaskedConv2d(module.in_channels, module.out_channels, module.kernel_size,
                                          module.stride, module.padding, module.dilation, module.groups, k=k)
        elif isinstance(module, nn.Linear):
            new = MaskedLinear(module.in_features, module.out_features, k=k)
        elif isinstance(module, nn.BatchNorm2d):
            new = NonAffineBatchNorm2d(module.num_features)
        else:
            continue
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
    return model


def _resnet_builder(spec: ResNetSpec) -> Callable[..., nn.Module]:
    def build(in_channels: int, num_classes: int, image_size: tuple[int, int], k: float = 0.5,
              width: float = 1.0) -> nn.Module:
        from torchvision.models import resnet  # lazy: importing torchvision costs seconds

        block = resnet.Bottleneck if spec.bottleneck else resnet.BasicBlock
        # Built on the meta device: torchvision's own (wasted) random init costs nothing there.
        with torch.device("meta"):
            model = resnet.ResNet(block, list(spec.layers), num_classes=num_classes,
                                  width_per_group=spec.width_per_group)
            if max(image_size) <= SMALL_IMAGE_MAX_SIDE:
                model.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
                model.maxpool = nn.Identity()
            else:
                model.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
        return _swap_layers(model, k)

    return build


def _resnet_counter(spec: ResNetSpec) -> Callable[..., int]:
    """torchvision's layer arithmetic (ResNet._make_layer, BasicBlock, Bottleneck) without building."""

    def count(in_channels: int, num_classes: int, image_size: tuple[int, int], width: float = 1.0) -> int:
        stem = 3 if max(image_size) <= SMALL_IMAGE_MAX_SIDE else 7
        total, inplanes = in_channels * 64 * stem * stem, 64
        expansion = 4 if spec.bottleneck else 1
        for stage, blocks in enumerate(spec.layers):
            planes = 64 << stage
            for index in range(blocks):
                if spec.bottleneck:
                    inner = planes * spec.width_per_group // 64
                    total += inplanes * inner + 9 * inner * inner + inner * planes * expansion
                else:
                    total += 9 * (inplanes * planes + planes * planes)
                if index == 0 and (stage > 0 or inplanes != planes * expansion):
                    total += inplanes * planes * expansion  # the 1x1 downsample shortcut
                inplanes = planes * expansion
        return total + inplanes * num_classes

    return count


for _name, _spec in RESNETS.items():
    register_arch(_name, f"torchvision {_spec.label}, masked, non-affine BN; CIFAR stem at <= 64 px",
                  _resnet_counter(_spec))(_resnet_builder(_spec))


# --- building seeded models --------------------------------------------------------------------------

def arch_args(in_channels: int, num_classes: int, image_size: tuple[int, int] | list[int],
              width: float = 1.0) -> dict:
    """The JSON-able arguments recorded in an artifact; with the arch name they rebuild the structure.

    `width` is recorded only when it is not 1, so width-1 artifacts keep their original bytes.
    """
    args = {"in_channels": int(in_channels), "num_classes": int(num_classes),
            "image_size": [int(image_size[0]), int(image_size[1])]}
    if check_width(width) != 1.0:
        args["width"] = float(width)
    return args


def _unpack(name: str, args: dict) -> tuple[int, int, tuple[int, int], float]:
    try:
        return (args["in_channels"], args["num_classes"], tuple(args["image_size"]),
                check_width(args.get("width", 1.0), name))
    except (KeyError, TypeError) as exc:
        raise MaskforgeError(f"bad arguments for architecture {name!r}: {args!r} ({exc})") from None


def build_structure(name: str, args: dict, k: float) -> nn.Module:
    """The network with all-zero weights and scores (use `create_model` for a seeded one)."""
    entry = get_arch(name)
    if not 0.0 < k <= 1.0:
        raise MaskforgeError(f"k must be in (0, 1], got {k}")
    in_channels, num_classes, image_size, width = _unpack(name, args)
    extra = {"width": width} if entry.widens else {}  # check_width refused width != 1 for the others
    try:
        return entry.builder(in_channels, num_classes, image_size, k=k, **extra)
    except (KeyError, TypeError) as exc:
        raise MaskforgeError(f"bad arguments for architecture {name!r}: {args!r} ({exc})") from None


def create_model(name: str, *, in_channels: int = 1, num_classes: int = 10,
                 image_size: tuple[int, int] | list[int] = (28, 28), k: float = 0.5, seed: int = 0,
                 init: str = "signed_constant", scale_fan: bool = False, width: float | None = None,
                 **kwargs) -> nn.Module:
    """Build architecture `name` with weights and scores regenerated from `seed`.

    `None` keyword arguments are dropped, so CLI defaults never override architecture defaults.

    >>> model = create_model("fc", in_channels=1, num_classes=10, image_size=(28, 28), k=0.5, seed=0)
    >>> sum(p.numel() for p in model.parameters())  # only the scores train
    266200
    >>> wide = create_model("fc", image_size=(28, 28), width=2.0)  # hidden layers 600 and 200
    >>> [tuple(p.shape) for p in wide.parameters()]
    [(600, 784), (200, 600), (10, 200)]
    """
    kwargs = {key: value for key, value in kwargs.items() if value is not None}
    if kwargs:
        raise MaskforgeError(f"unexpected architecture options: {', '.join(sorted(kwargs))}")
    if init not in regen.DISTRIBUTIONS:
        raise MaskforgeError(f"unknown weight distribution {init!r}; choose from {', '.join(regen.DISTRIBUTIONS)}")
    args = arch_args(in_channels, num_classes, image_size, 1.0 if width is None else width)
    model = build_structure(name, args, k)
    layers = masked_modules(model)
    weights = regenerate_weights(model, seed, init, k=k, scale_fan=scale_fan)
    with torch.no_grad():
        for layer_name, layer in layers.items():
            layer.weight.copy_(torch.from_numpy(weights[f"{layer_name}.weight"]))
            bound = 1.0 / math.sqrt(regen.fan_in(layer.weight.shape))  # PyTorch's default conv/linear bound
            layer.scores.copy_(torch.from_numpy(
                regen.uniform(seed, f"{layer_name}.scores", layer.weight.shape, bound)))
    return model


def regenerate_weights(model: nn.Module, seed: int, init: str, *, k: float, scale_fan: bool,
                       threads: int | None = None) -> dict[str, np.ndarray]:
    """`{param name: float32 array}` for every masked layer of `model`, generated in parallel threads."""
    shapes = {f"{name}.weight": tuple(layer.weight.shape) for name, layer in masked_modules(model).items()}
    generated = regen.generate_many(seed, shapes, init, k=k, scale_fan=scale_fan, threads=threads)
    return {name: weight for name, (weight, _) in generated.items()}


def count_masked_weights(name: str, args: dict) -> int:
    """Weights under a mask for `name` with `args`, from the arguments alone (nothing is built, unless the
    architecture was registered without a counter)."""
    entry = get_arch(name)
    if entry.count is not None:
        return entry.count(*_unpack(name, args))
    with torch.device("meta"):
        model = build_structure(name, args, 0.5)
    return sum(layer.weight.numel() for layer in masked_modules(model).values())


def list_archs() -> list[dict]:
    """Every registered architecture with its masked-weight count at CIFAR-10 and ImageNet shapes."""
    return [{"name": name, "description": entry.description,
             "weights_cifar10": count_masked_weights(name, arch_args(3, 10, (32, 32))),
             "weights_imagenet": count_masked_weights(name, arch_args(3, 1000, (224, 224)))}
            for name, entry in ARCHS.items()]

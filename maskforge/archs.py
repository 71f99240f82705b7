"""Architecture builders: the masked networks, `register_arch`, and `create_model` to build a seeded network.

Every architecture is a function `(in_channels, num_classes, image_size, k=..., width=...) -> nn.Module`
built from the masked layers of `layers.py`. Its name, description, width rule and weight count live in
the torch-free registry (`maskforge.registry`, which `maskforge archs` reads); importing this module
attaches each built-in builder to its registry entry, and `register_arch` adds a new architecture with
its builder. `create_model` then fills every weight from the portable generator and every score from its
own stream, so a network is fully described by (arch, arch args, seed, init, k). The width multiplier is
defined in the registry's docstring and docs/FORMAT.md section 2.5.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import numpy as np
import torch
import torch.nn as nn

from . import convert, regen, registry
from .errors import MaskforgeError
from .layers import MaskedConv2d, MaskedLinear, masked_modules
from .registry import (
    ARCHS,
    CONV_FC_HIDDEN,
    CONV_WIDTHS,
    FC_HIDDEN,
    MAX_WIDTH,
    RESNETS,
    SMALL_IMAGE_MAX_SIDE,
    ArchEntry,
    ResNetSpec,
    add_entry,
    arch_args,
    arch_names,
    check_width,
    count_masked_weights,
    get_arch,
    list_archs,
    pooled_size,
    scaled_width,
    unpack_args,
)

__all__ = [
    "ARCHS",
    "ArchEntry",
    "register_arch",
    "arch_names",
    "get_arch",
    "arch_args",
    "check_width",
    "scaled_width",
    "count_masked_weights",
    "list_archs",
    "build_structure",
    "create_model",
    "regenerate_weights",
    "MAX_WIDTH",
    "SMALL_IMAGE_MAX_SIDE",
    "RESNETS",
    "ResNetSpec",
]


def _count_reference(name: str, args: dict) -> int:
    """A builder reference's masked weights: its converted model, built on the meta device, counted."""
    return convert.count_weights(convert.convert(convert.source_model(name, args), 0.5, name))


registry.reference_counter = _count_reference


def register_arch(
    name: str, description: str, count: Callable[..., int] | None = None, widens: bool = False
) -> Callable:
    """Decorator: add an architecture builder to the registry under `name`.

    `count(in_channels, num_classes, image_size, width)` gives its masked weights without building it
    (without one, counting builds the network on the meta device); `widens`: the builder takes `width`.
    """

    def decorator(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        add_entry(ArchEntry(name, description, count or _counted_by_building(name), widens, builder))
        return builder

    return decorator


def _builds(name: str) -> Callable:
    """Decorator: attach the builder of the built-in architecture `name` to its registry entry."""

    def decorator(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        add_entry(dataclasses.replace(get_arch(name), builder=builder))
        return builder

    return decorator


def _counted_by_building(name: str) -> Callable[..., int]:
    def count(in_channels: int, num_classes: int, image_size: tuple[int, int], width: float = 1.0) -> int:
        with torch.device("meta"):
            model = build_structure(name, arch_args(in_channels, num_classes, image_size, width), 0.5)
        return sum(layer.weight.numel() for layer in masked_modules(model).values())

    return count


# --- the paper's small networks (Table 1; no batch norm, as in the reference code) ------------------


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

    def __init__(
        self,
        widths: list[int],
        in_channels: int,
        num_classes: int,
        image_size: tuple[int, int],
        k: float = 0.5,
        width: float = 1.0,
    ) -> None:
        super().__init__()
        height, side = pooled_size(image_size, len(widths))
        self.features, channels = _conv_stack([scaled_width(w, width) for w in widths], in_channels, k)
        hidden = [scaled_width(units, width) for units in CONV_FC_HIDDEN]
        self.classifier = nn.Sequential(nn.Flatten(), *_mlp([channels * height * side, *hidden, num_classes], k))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


@_builds("fc")
def fc(
    in_channels: int, num_classes: int, image_size: tuple[int, int], k: float = 0.5, width: float = 1.0
) -> nn.Module:
    inputs = in_channels * image_size[0] * image_size[1]
    hidden = [scaled_width(units, width) for units in FC_HIDDEN]
    return nn.Sequential(nn.Flatten(), *_mlp([inputs, *hidden, num_classes], k))


def _convnet_builder(widths: list[int]) -> Callable[..., nn.Module]:
    def build(
        in_channels: int, num_classes: int, image_size: tuple[int, int], k: float = 0.5, width: float = 1.0
    ) -> nn.Module:
        return ConvNet(widths, in_channels, num_classes, image_size, k, width)

    return build


for _name, _widths in CONV_WIDTHS.items():
    _builds(_name)(_convnet_builder(_widths))


# --- torchvision ResNets with every conv/linear masked and every BN non-affine ------------------------


def _resnet_builder(spec: ResNetSpec) -> Callable[..., nn.Module]:
    def build(
        in_channels: int, num_classes: int, image_size: tuple[int, int], k: float = 0.5, width: float = 1.0
    ) -> nn.Module:
        from torchvision.models import resnet  # lazy: importing torchvision costs seconds

        block = resnet.Bottleneck if spec.bottleneck else resnet.BasicBlock
        # Built on the meta device: torchvision's own (wasted) random init costs nothing there.
        with torch.device("meta"):
            model = resnet.ResNet(
                block, list(spec.layers), num_classes=num_classes, width_per_group=spec.width_per_group
            )
            if max(image_size) <= SMALL_IMAGE_MAX_SIDE:
                model.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
                model.maxpool = nn.Identity()
            else:
                model.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
        return convert.finish(convert.convert(model, k, spec.label))

    return build


for _name, _spec in RESNETS.items():
    _builds(_name)(_resnet_builder(_spec))


# --- building seeded models --------------------------------------------------------------------------


def build_structure(name: str, args: dict, k: float) -> nn.Module:
    """The network with all-zero weights and scores (use `create_model` for a seeded one).

    `name` is a registered architecture or a builder reference (`torchvision:NAME`, `module:callable`,
    `file.py:callable`; maskforge.convert), whose keyword arguments are `args["builder_args"]`.
    """
    if not 0.0 < k <= 1.0:
        raise MaskforgeError(f"k must be in (0, 1], got {k}")
    if convert.is_reference(name):
        return convert.build(name, args, k)
    entry = get_arch(name)
    if args.get("builder_args"):
        raise MaskforgeError(
            f"architecture {name} takes no builder arguments (--arch-args is for builder "
            f"references such as torchvision:NAME)"
        )
    in_channels, num_classes, image_size, width = unpack_args(name, args)
    extra = {"width": width} if entry.widens else {}  # check_width refused width != 1 for the others
    try:
        return entry.builder(in_channels, num_classes, image_size, k=k, **extra)
    except (KeyError, TypeError) as exc:
        raise MaskforgeError(f"bad arguments for architecture {name!r}: {args!r} ({exc})") from None


def create_model(
    name: str,
    *,
    in_channels: int = 1,
    num_classes: int = 10,
    image_size: tuple[int, int] | list[int] = (28, 28),
    k: float = 0.5,
    seed: int = 0,
    init: str = "signed_constant",
    scale_fan: bool = False,
    width: float | None = None,
    builder_args: dict | None = None,
    **kwargs,
) -> nn.Module:
    """Build architecture `name` with weights and scores regenerated from `seed`.

    `name` may be a builder reference (`torchvision:mobilenet_v3_small`, `mynet.py:build`) with its keyword
    arguments in `builder_args`; its fixed tensors (maskforge.convert.FIXED_RULES) come from `seed` too.

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
    args = arch_args(in_channels, num_classes, image_size, 1.0 if width is None else width, builder_args)
    model = build_structure(name, args, k)
    convert.fill_fixed(model, seed)
    layers = masked_modules(model)
    weights = regenerate_weights(model, seed, init, k=k, scale_fan=scale_fan)
    with torch.no_grad():
        for layer_name, layer in layers.items():
            layer.weight.copy_(torch.from_numpy(weights[f"{layer_name}.weight"]))
            bound = 1.0 / math.sqrt(regen.fan_in(layer.weight.shape))  # PyTorch's default conv/linear bound
            layer.scores.copy_(torch.from_numpy(regen.uniform(seed, f"{layer_name}.scores", layer.weight.shape, bound)))
    return model


def regenerate_weights(
    model: nn.Module, seed: int, init: str, *, k: float, scale_fan: bool, threads: int | None = None
) -> dict[str, np.ndarray]:
    """`{param name: float32 array}` for every masked layer of `model`, generated in parallel threads."""
    shapes = {f"{name}.weight": tuple(layer.weight.shape) for name, layer in masked_modules(model).items()}
    generated = regen.generate_many(seed, shapes, init, k=k, scale_fan=scale_fan, threads=threads)
    return {name: weight for name, (weight, _) in generated.items()}

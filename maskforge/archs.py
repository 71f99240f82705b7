"""Architecture registry: a plain dict filled by a decorator, and `create_model` to build a seeded network.

Every architecture is a function `(in_channels, num_classes, image_size) -> nn.Module` built from the
masked layers of `layers.py`. `create_model` then fills every weight from the portable generator and
every score from its own stream, so a network is fully described by (arch, arch args, seed, init, k).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torchvision

from . import regen
from .errors import MaskforgeError
from .layers import MaskedConv2d, MaskedLinear, NonAffineBatchNorm2d, masked_modules

SMALL_IMAGE_MAX_SIDE = 64  # at or below this, ResNets use the CIFAR stem (3x3 conv, stride 1, no max-pool)


@dataclass(frozen=True)
class ArchEntry:
    name: str
    builder: Callable[..., nn.Module]
    description: str


ARCHS: dict[str, ArchEntry] = {}


def register_arch(name: str, description: str) -> Callable:
    """Decorator: add an architecture builder to the registry under `name`."""

    def decorator(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        ARCHS[name] = ArchEntry(name, builder, description)
        return builder

    return decorator


def arch_names() -> list[str]:
    return list(ARCHS)


def get_arch(name: str) -> ArchEntry:
    if name not in ARCHS:
        raise MaskforgeError(f"unknown architecture {name!r}; choose from: {', '.join(ARCHS)}")
    return ARCHS[name]


# --- the paper's small networks (Table 1; no batch norm, as in the reference code) ------------------

def _conv_stack(widths: list[int], in_channels: int, k: float) -> tuple[nn.Sequential, int, int]:
    layers: list[nn.Module] = []
    channels, pools = in_channels, 0
    for stage_width in widths:
        for _ in range(2):
            layers += [MaskedConv2d(channels, stage_width, 3, padding=1, k=k), nn.ReLU(inplace=True)]
            channels = stage_width
        layers.append(nn.MaxPool2d(2))
        pools += 1
    return nn.Sequential(*layers), channels, pools


class ConvNet(nn.Module):
    """The paper's Conv-2/4/6/8: pairs of 3x3 convs each followed by a 2x2 max-pool, then FC 256-256-C."""

    def __init__(self, widths: list[int], in_channels: int, num_classes: int, image_size: tuple[int, int],
                 k: float = 0.5) -> None:
        super().__init__()
        self.features, channels, pools = _conv_stack(widths, in_channels, k)
        height, width = image_size[0] >> pools, image_size[1] >> pools
        if height < 1 or width < 1:
            raise MaskforgeError(f"images of {image_size[0]}x{image_size[1]} are too small for {len(widths)} "
                                 f"pooling stages (need at least {2 ** pools}x{2 ** pools})")
        self.classifier = nn.Sequential(
            nn.Flatten(),
            MaskedLinear(channels * height * width, 256, k=k), nn.ReLU(inplace=True),
            MaskedLinear(256, 256, k=k), nn.ReLU(inplace=True),
            MaskedLinear(256, num_classes, k=k),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


@register_arch("fc", "LeNet 300-100 MLP (paper section 4.2), sized to the input")
def fc(in_channels: int, num_classes: int, image_size: tuple[int, int], k: float = 0.5) -> nn.Module:
    inputs = in_channels * image_size[0] * image_size[1]
    return nn.Sequential(
        nn.Flatten(),
        MaskedLinear(inputs, 300, k=k), nn.ReLU(inplace=True),
        MaskedLinear(300, 100, k=k), nn.ReLU(inplace=True),
        MaskedLinear(100, num_classes, k=k),
    )


_CONV_WIDTHS = {"conv2": [64], "conv4": [64, 128], "conv6": [64, 128, 256], "conv8": [64, 128, 256, 512]}
for _name, _widths in _CONV_WIDTHS.items():
    register_arch(_name, f"the paper's {_name[:4].capitalize()}-{_name[4:]}: {len(_widths) * 2} 3x3 convs "
                         f"({'/'.join(map(str, _widths))} wide) + FC 256-256")(
        lambda in_channels, num_classes, image_size, k=0.5, _w=_widths: ConvNet(_w, in_channels, num_classes,
                                                                               image_size, k))


# --- torchvision ResNets with every conv/linear masked and every BN non-affine ------------------------

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


def _torchvision_resnet(constructor: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    def build(in_channels: int, num_classes: int, image_size: tuple[int, int], k: float = 0.5) -> nn.Module:
        # Built on the meta device: torchvision's own (wasted) random init costs nothing there.
        with torch.device("meta"):
            model = constructor(weights=None, num_classes=num_classes)
            if max(image_size) <= SMALL_IMAGE_MAX_SIDE:
                model.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
                model.maxpool = nn.Identity()
            else:
                model.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
        return _swap_layers(model, k)

    return build


for _name, _constructor, _label in [
    ("resnet18", torchvision.models.resnet18, "ResNet-18"),
    ("resnet34", torchvision.models.resnet34, "ResNet-34"),
    ("resnet50", torchvision.models.resnet50, "ResNet-50"),
    ("resnet101", torchvision.models.resnet101, "ResNet-101"),
    ("resnet152", torchvision.models.resnet152, "ResNet-152"),
    ("wrn50", torchvision.models.wide_resnet50_2, "Wide ResNet-50-2"),
    ("wrn101", torchvision.models.wide_resnet101_2, "Wide ResNet-101-2"),
]:
    register_arch(_name, f"torchvision {_label}, masked, non-affine BN; CIFAR stem at <= 64 px")(
        _torchvision_resnet(_constructor))


# --- building seeded models --------------------------------------------------------------------------

def arch_args(in_channels: int, num_classes: int, image_size: tuple[int, int] | list[int]) -> dict:
    """The JSON-able arguments recorded in an artifact; with the arch name they rebuild the structure."""
    return {"in_channels": int(in_channels), "num_classes": int(num_classes),
            "image_size": [int(image_size[0]), int(image_size[1])]}


def build_structure(name: str, args: dict, k: float) -> nn.Module:
    """The network with all-zero weights and scores (use `create_model` for a seeded one)."""
    entry = get_arch(name)
    if not 0.0 < k <= 1.0:
        raise MaskforgeError(f"k must be in (0, 1], got {k}")
    try:
        return entry.builder(args["in_channels"], args["num_classes"], tuple(args["image_size"]), k=k)
    except (KeyError, TypeError) as exc:
        raise MaskforgeError(f"bad arguments for architecture {name!r}: {args!r} ({exc})") from None


def create_model(name: str, *, in_channels: int = 1, num_classes: int = 10,
                 image_size: tuple[int, int] | list[int] = (28, 28), k: float = 0.5, seed: int = 0,
                 init: str = "signed_constant", scale_fan: bool = False, **kwargs) -> nn.Module:
    """Build architecture `name` with weights and scores regenerated from `seed`.

    `None` keyword arguments are dropped, so CLI defaults never override architecture defaults.

    >>> model = create_model("fc", in_channels=1, num_classes=10, image_size=(28, 28), k=0.5, seed=0)
    >>> sum(p.numel() for p in model.parameters())  # only the scores train
    266200
    """
    kwargs = {key: value for key, value in kwargs.items() if value is not None}
    if kwargs:
        raise MaskforgeError(f"unexpected architecture options: {', '.join(sorted(kwargs))}")
    if init not in regen.DISTRIBUTIONS:
        raise MaskforgeError(f"unknown weight distribution {init!r}; choose from {', '.join(regen.DISTRIBUTIONS)}")
    model = build_structure(name, arch_args(in_channels, num_classes, image_size), k)
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
    """Weights under a mask for `name` with `args`, computed without allocating the network."""
    with torch.device("meta"):
        model = build_structure(name, args, 0.5)
    return sum(layer.weight.numel() for layer in masked_modules(model).values())


def list_archs() -> list[dict]:
    """Every registered architecture with its masked-weight count at CIFAR-10 and ImageNet shapes."""
    return [{"name": name, "description": entry.description,
             "weights_cifar10": count_masked_weights(name, arch_args(3, 10, (32, 32))),
             "weights_imagenet": count_masked_weights(name, arch_args(3, 1000, (224, 224)))}
            for name, entry in ARCHS.items()]

"""The architecture registry without torch: names, descriptions, arguments, widths and weight counts.

`maskforge archs` and everything that only needs to know about an architecture (its name, whether it
takes a width, how many weights it masks at a given input) read this module, which imports neither torch
nor numpy, so the command answers in a fraction of a second. The builders live in `maskforge.archs`,
which attaches each one to its entry here when it is imported (`ArchEntry.builder`); `register_arch`
there adds a new architecture with its builder.

Weight counts are arithmetic from the arguments alone: the layer shapes of docs/FORMAT.md section 2 for
the paper's networks and torchvision's ResNet layer arithmetic (tests/test_archs.py checks every count
against a real build).

Width multiplier (`width`, the paper's figures 4 and 5; docs/FORMAT.md section 2.5): every hidden layer of
the conv and fc networks gets `max(1, round_half_even(u * width))` units (a binary64 product, Python's
`round`), where `u` is the paper's width (64/128/256/512 channels, the 256-unit FC layers, LeNet's 300
and 100); the input and the classes stay. The ResNets keep torchvision's widths (wrn50/wrn101 are the
wide ones): `width` other than 1 is refused for them. `arch.args` records `width` only when it is not 1,
so width-1 artifacts are unchanged.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Callable

from .errors import MaskforgeError

SMALL_IMAGE_MAX_SIDE = 64  # at or below this, ResNets use the CIFAR stem (3x3 conv, stride 1, no max-pool)
MAX_BUILDER_ARGS_BYTES = 10_000  # an artifact is untrusted input: a builder's arguments stay small
REFUSED_BUILDER_ARGS = ("weights", "weights_backbone", "progress")  # pretrained weights are not seed + mask
MAX_WIDTH = 64.0  # the largest width multiplier accepted (a bound for untrusted artifacts)

#: (in_channels, num_classes, image_size, width) -> masked weights (a builder reference's also takes builder_args=)
Counter = Callable[..., int]


@dataclass(frozen=True)
class ArchEntry:
    name: str
    description: str
    count: Counter  # masked weights from the arguments alone
    widens: bool = False  # whether the builder takes `width` (other than 1)
    builder: Callable[..., Any] | None = None  # (in_channels, num_classes, image_size, k=, [width=]) -> nn.Module;
    #                                             attached by maskforge.archs when it is imported


ARCHS: dict[str, ArchEntry] = {}


def add_entry(entry: ArchEntry) -> None:
    """Register (or replace) an architecture's entry."""
    ARCHS[entry.name] = entry


def arch_names() -> list[str]:
    return list(ARCHS)


def get_arch(name: str) -> ArchEntry:
    """The registered architecture `name`, or an entry for a builder reference (`torchvision:NAME`,
    `module:callable`, `file.py:callable`: maskforge.convert), which builds to count its weights."""
    if ":" in name and name not in ARCHS:
        return ArchEntry(name, "builder reference (maskforge.convert)", _reference_counter(name))
    if name not in ARCHS:
        guess = closest_arch(name)
        hint = f" (did you mean {guess!r}?)" if guess else ""
        raise MaskforgeError(f"unknown architecture {name!r}{hint}; choose from: {', '.join(ARCHS)}")
    return ARCHS[name]


def closest_arch(name: str) -> str | None:
    """The registered name `name` was probably meant as: the same letters and digits in any case and
    punctuation (`WRN-50` -> `wrn50`), else the one nearest by spelling; None when nothing is close or
    two are equally close (`conv5`)."""
    from difflib import SequenceMatcher

    def bare(text: str) -> str:
        return "".join(ch for ch in text.lower() if ch.isalnum())

    scores = sorted(((SequenceMatcher(None, bare(name), bare(known)).ratio(), known) for known in ARCHS), reverse=True)
    if not scores or scores[0][0] < 0.75 or (len(scores) > 1 and scores[1][0] == scores[0][0] < 1):
        return None
    return scores[0][1]


#: Counts a builder reference's masked weights by building it on the meta device: (name, arch args) -> int.
#: Set by maskforge.archs, which imports maskforge.convert (torch); this module stays torch-free and below
#: convert in the layers (ARCHITECTURE.md), so it never imports it, not even inside a function.
reference_counter: Callable[[str, dict], int] | None = None


def _reference_counter(name: str) -> Counter:
    def count(
        in_channels: int,
        num_classes: int,
        image_size: tuple[int, int],
        width: float = 1.0,
        builder_args: dict | None = None,
    ) -> int:
        if reference_counter is None:
            raise MaskforgeError(
                f"{name}: a builder reference is counted by building it; import maskforge.archs "
                f"(which registers the counter) first"
            )
        return reference_counter(name, arch_args(in_channels, num_classes, image_size, width, builder_args))

    return count


def check_builder_args(values: Any, label: str = "arch args") -> dict:
    """The builder's keyword arguments: a small JSON object without pretrained weights."""
    if not isinstance(values, dict):
        raise MaskforgeError(f"{label} must be a JSON object of the builder's keyword arguments, got {values!r}")
    try:
        text = json.dumps(values, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise MaskforgeError(f"{label} must hold JSON values only ({exc})") from None
    if len(text) > MAX_BUILDER_ARGS_BYTES:
        raise MaskforgeError(f"{label} is {len(text):,} bytes of JSON, more than {MAX_BUILDER_ARGS_BYTES:,}")
    refused = [key for key in REFUSED_BUILDER_ARGS if key in values]
    if refused:
        raise MaskforgeError(
            f"{label}: {refused[0]} is not accepted: the weights are regenerated from the seed, never loaded"
        )
    return json.loads(text)


def parse_builder_args(text: str | None, label: str = "--arch-args") -> dict:
    """`--arch-args` text (a JSON object) as a dict ({} for None)."""
    if text is None or text == "":
        return {}
    try:
        values = json.loads(text)
    except ValueError as exc:
        raise MaskforgeError(f"{label} is not JSON ({exc}): give an object such as '{{\"num_layers\": 2}}'") from None
    return check_builder_args(values, label)


def scaled_width(units: int, width: float) -> int:
    """The paper's `units` times the width multiplier: max(1, round half to even of units * width)."""
    return max(1, round(units * float(width)))


def check_width(width, arch: str | None = None) -> float:
    """`width` as a float, or a MaskforgeError naming the field (and the architecture that refuses it)."""
    if (
        isinstance(width, bool)
        or not isinstance(width, (int, float))
        or not math.isfinite(width)
        or not 0.0 < width <= MAX_WIDTH
    ):
        raise MaskforgeError(f"width must be a number in (0, {MAX_WIDTH:g}] (the width multiplier), got {width!r}")
    if arch is not None and width != 1 and not get_arch(arch).widens:
        widening = ", ".join(name for name, entry in ARCHS.items() if entry.widens)
        raise MaskforgeError(
            f"width {width:g}: architecture {arch} has fixed widths (width must be 1); the "
            f"width multiplier applies to {widening} (wrn50/wrn101 are the wide ResNets)"
        )
    return float(width)


def arch_args(
    in_channels: int,
    num_classes: int,
    image_size: tuple[int, int] | list[int],
    width: float = 1.0,
    builder_args: dict | None = None,
) -> dict:
    """The JSON-able arguments recorded in an artifact; with the arch name they rebuild the structure.

    `width` is recorded only when it is not 1 and `builder_args` (a builder reference's keyword
    arguments) only when given, so the built-ins' artifacts keep their original bytes.
    """
    args = {
        "in_channels": int(in_channels),
        "num_classes": int(num_classes),
        "image_size": [int(image_size[0]), int(image_size[1])],
    }
    if check_width(width) != 1.0:
        args["width"] = float(width)
    if builder_args:
        args["builder_args"] = dict(builder_args)
    return args


def unpack_args(name: str, args: dict) -> tuple[int, int, tuple[int, int], float]:
    """(in_channels, num_classes, image_size, width) of `args`, the width checked against architecture `name`."""
    try:
        return (
            args["in_channels"],
            args["num_classes"],
            tuple(args["image_size"]),
            check_width(args.get("width", 1.0), name),
        )
    except (KeyError, TypeError) as exc:
        raise MaskforgeError(f"bad arguments for architecture {name!r}: {args!r} ({exc})") from None


def count_masked_weights(name: str, args: dict) -> int:
    """Weights under a mask for `name` with `args`, from the arguments alone (a builder reference: built on
    the meta device)."""
    if ":" in name and name not in ARCHS:
        return get_arch(name).count(*unpack_args(name, args), builder_args=args.get("builder_args"))
    return get_arch(name).count(*unpack_args(name, args))


def list_archs() -> list[dict]:
    """Every registered architecture with its masked-weight count at CIFAR-10 and ImageNet shapes.

    >>> [entry["weights_cifar10"] for entry in list_archs() if entry["name"] == "fc"]
    [952600]
    """
    return [
        {
            "name": name,
            "description": entry.description,
            "weights_cifar10": count_masked_weights(name, arch_args(3, 10, (32, 32))),
            "weights_imagenet": count_masked_weights(name, arch_args(3, 1000, (224, 224))),
        }
        for name, entry in ARCHS.items()
    ]


# --- the paper's small networks (Table 1; no batch norm, as in the reference code) ------------------

FC_HIDDEN = (300, 100)  # LeNet 300-100
CONV_FC_HIDDEN = (256, 256)  # the FC head of Conv-2/4/6/8
CONV_WIDTHS = {"conv2": [64], "conv4": [64, 128], "conv6": [64, 128, 256], "conv8": [64, 128, 256, 512]}


def pooled_size(image_size: tuple[int, int], stages: int) -> tuple[int, int]:
    """The activation's side after `stages` 2x2 max-pools, or an error when the image is too small."""
    height, width = image_size[0] >> stages, image_size[1] >> stages
    if height < 1 or width < 1:
        raise MaskforgeError(
            f"images of {image_size[0]}x{image_size[1]} are too small for {stages} "
            f"pooling stages (need at least {2**stages}x{2**stages})"
        )
    return height, width


def _mlp_count(sizes: list[int]) -> int:
    return sum(a * b for a, b in zip(sizes, sizes[1:]))


def _count_fc(in_channels: int, num_classes: int, image_size: tuple[int, int], width: float = 1.0) -> int:
    inputs = in_channels * image_size[0] * image_size[1]
    return _mlp_count([inputs, *(scaled_width(units, width) for units in FC_HIDDEN), num_classes])


def _convnet_counter(widths: list[int]) -> Counter:
    def count(in_channels: int, num_classes: int, image_size: tuple[int, int], width: float = 1.0) -> int:
        height, side = pooled_size(image_size, len(widths))
        total, channels = 0, in_channels
        for stage_width in (scaled_width(w, width) for w in widths):
            total += 9 * (channels * stage_width + stage_width * stage_width)
            channels = stage_width
        hidden = [scaled_width(units, width) for units in CONV_FC_HIDDEN]
        return total + _mlp_count([channels * height * side, *hidden, num_classes])

    return count


add_entry(ArchEntry("fc", "LeNet 300-100 MLP (paper section 4.2), sized to the input", _count_fc, widens=True))
for _name, _widths in CONV_WIDTHS.items():
    add_entry(
        ArchEntry(
            _name,
            f"the paper's {_name[:4].capitalize()}-{_name[4:]}: {len(_widths) * 2} 3x3 convs "
            f"({'/'.join(map(str, _widths))} wide) + FC 256-256",
            _convnet_counter(_widths),
            widens=True,
        )
    )


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


def _resnet_counter(spec: ResNetSpec) -> Counter:
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
    add_entry(
        ArchEntry(
            _name, f"torchvision {_spec.label}, masked, non-affine BN; CIFAR stem at <= 64 px", _resnet_counter(_spec)
        )
    )

"""Any `nn.Module` -> a masked network with the built-in networks' guarantees (docs/FORMAT.md section 2.6).

An architecture is either a registered name (`conv4`, `resnet18`, ...) or a *builder reference*:

* `torchvision:NAME` — one of torchvision's classification builders (`torchvision:mobilenet_v3_small`) or a
  model class of `torchvision.models` (`torchvision:VisionTransformer`);
* `package.module:callable` — a builder in the user's own importable code;
* `path/to/file.py:callable` — a builder in a Python file (relative to the working folder).

The builder is called with the JSON keyword arguments of `--arch-args` (`arch.args.builder_args` in the
artifact), plus `num_classes` (torchvision, and user builders whose signature names it; likewise
`in_channels` and `image_size` for user builders), on the meta device: its own random initialization
costs nothing and is never kept. `convert` then applies the conversion rules, the same for every model:

* every `Conv1d/2d/3d` (grouped and depthwise included) and every `Linear` becomes its masked twin;
  `nn.MultiheadAttention` becomes `layers.ProjectedAttention`, whose input projection (embed -> 3 x embed)
  and output projection are masked Linears `in_proj` and `out_proj`. Fan-in: the weight's
  product(shape[1:]), as for the built-ins;
* every bias of those layers is fixed to 0 (the layer is bias-free, as the paper's networks are);
* batch, layer and group norms (their subclasses too, e.g. torchvision's LayerNorm2d) lose their affine
  scale and shift (fixed to 1 and 0); batch norms keep running statistics, which the artifact stores, and
  update them with PyTorch's default momentum 0.1 (torchvision's 0.01 barely moves in a short search);
* other parameters follow `FIXED_RULES` (ViT's class token 0, its position embedding regenerated from the
  seed, ConvNeXt's layer scale 1); any other parameter or buffer refuses the model in one line naming it;
* dropout and stochastic depth are off (replaced by identities): the search evaluates the network it
  ships, and the paper's networks have no dropout;
* torchvision builders take 3 input channels: for other data the first convolution (the stem) is rebuilt
  with the data's channels.

The model the builder returned (after the stem rule, before conversion) is described by its *structure*:
one line per parameter and buffer (name, kind, shape, owning module's class), in module order. The
artifact records it with its SHA-256, so a builder whose structure changed is refused at load time in one
line naming the first difference, while a new torchvision release with the same structure loads.

Importing a user's module runs its code, so an artifact naming user code is loaded only when the process
trusts that reference: the search that named it, a builder handed to `builder_reference`, or the
MASKFORGE_TRUST_CODE environment variable (comma-separated references, or `*`).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import inspect
import math
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

from . import regen
from .errors import MaskforgeError, first_line
from .registry import check_builder_args, parse_builder_args  # noqa: F401 - part of this module's API
from .layers import (
    MASKED_TYPES,
    MaskedConv1d,
    MaskedConv2d,
    MaskedConv3d,
    MaskedLinear,
    ProjectedAttention,
    masked_modules,
)

__all__ = [
    "TRUST_ENV",
    "FIXED_RULES",
    "is_reference",
    "builder_reference",
    "trust",
    "resolve",
    "source_model",
    "structure_entries",
    "structure_digest",
    "first_difference",
    "call_entries",
    "builder_record",
    "build_recorded",
    "library_of",
    "convert",
    "build",
    "fill_fixed",
    "plain_layers",
    "torchvision_builders",
    "zoo",
]

TRUST_ENV = "MASKFORGE_TRUST_CODE"

_REFERENCE = re.compile(r"(?P<target>[^:]+):(?P<attr>[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*)")
_builders: dict[str, Callable[..., nn.Module]] = {}  # references handed in as callables (builder_reference)
_trusted: set[str] = set()
_file_modules: dict[str, Any] = {}


# --- builder references ------------------------------------------------------------------------------------


def is_reference(name: str) -> bool:
    """Whether an architecture name is a builder reference (has a colon) rather than a registered name."""
    return ":" in name


def _parse(reference: str) -> tuple[str, str]:
    match = _REFERENCE.fullmatch(reference)
    if match is None:
        raise MaskforgeError(
            f"architecture {reference!r} is not a builder reference: write torchvision:NAME, "
            f"package.module:callable or file.py:callable"
        )
    return match["target"], match["attr"]


def builder_reference(builder: Callable[..., nn.Module], name: str | None = None) -> str:
    """Register a builder callable for this process and return the reference to search it by
    (`SearchConfig(arch=builder_reference(build))`): `module:qualname` unless `name` is given. The
    artifact records the reference; loading it in another process needs that reference importable."""
    if not callable(builder):
        raise MaskforgeError(f"a builder must be callable, got {type(builder).__name__}")
    reference = name or f"{builder.__module__}:{builder.__qualname__}"
    _parse(reference)
    if reference.startswith("torchvision:"):
        raise MaskforgeError(f"{reference}: the torchvision: prefix names torchvision's own builders")
    _builders[reference] = builder
    _trusted.add(reference)
    return reference


def trust(reference: str) -> None:
    """Allow this process to import and run the code `reference` names (the user named it)."""
    if is_reference(reference):
        _trusted.add(reference)


def _is_trusted(reference: str) -> bool:
    allowed = {item.strip() for item in os.environ.get(TRUST_ENV, "").split(",") if item.strip()}
    return reference in _trusted or reference in allowed or "*" in allowed


def torchvision_builders() -> list[str]:
    """torchvision's classification builders, by name (`maskforge archs --all`)."""
    import torchvision.models as models

    return sorted(models.list_models(module=models))


def resolve(reference: str) -> Callable[..., nn.Module]:
    """The builder callable a reference names (user code only when trusted)."""
    target, attr = _parse(reference)
    if target == "torchvision":
        import torchvision.models as models

        if attr in torchvision_builders():
            return models.get_model_builder(attr)
        model_class = getattr(models, attr, None)
        if isinstance(model_class, type) and issubclass(model_class, nn.Module):
            return model_class
        raise MaskforgeError(f"torchvision has no classification model {attr!r} (maskforge archs --all lists them)")
    if reference in _builders:
        return _builders[reference]
    if not _is_trusted(reference):
        raise MaskforgeError(
            f"architecture {reference} is user code, and loading it would import and run that "
            f"code: set {TRUST_ENV}={reference} to allow it"
        )
    module = _import(target, reference)
    found: Any = module
    for part in attr.split("."):
        found = getattr(found, part, None)
    if not callable(found):
        raise MaskforgeError(f"architecture {reference}: {target} has no callable {attr}")
    return found


def _import(target: str, reference: str):
    try:
        if target.endswith(".py"):
            path = Path(target).resolve()
            if str(path) not in _file_modules:
                if not path.is_file():
                    raise MaskforgeError(f"architecture {reference}: no file {target} (relative to {Path.cwd()})")
                name = "maskforge_user_" + hashlib.sha256(str(path).encode()).hexdigest()[:12]
                spec = importlib.util.spec_from_file_location(name, path)
                if spec is None or spec.loader is None:
                    raise MaskforgeError(f"architecture {reference}: {target} cannot be imported as a Python module")
                module = importlib.util.module_from_spec(spec)
                spec.loader.exec_module(module)
                _file_modules[str(path)] = module
            return _file_modules[str(path)]
        return importlib.import_module(target)
    except MaskforgeError:
        raise
    except Exception as exc:  # noqa: BLE001 - the user's module may raise anything while importing
        raise MaskforgeError(
            f"architecture {reference}: cannot import {target} ({type(exc).__name__}: {first_line(exc)})"
        ) from None


def library_of(reference: str) -> str:
    """What the artifact depends on besides maskforge: 'torchvision 0.20.1', or the user code's name."""
    target, _ = _parse(reference)
    if target == "torchvision":
        import torchvision

        return f"torchvision {torchvision.__version__.split('+')[0]}"
    top = target.split(".")[0]
    version = None
    if not target.endswith(".py"):
        try:
            from importlib.metadata import version as package_version

            version = package_version(top)
        except Exception:  # noqa: BLE001 - not an installed distribution
            version = None
    return f"user code {target}" + (f" {version}" if version else "")


# --- building the source model ----------------------------------------------------------------------------


def _accepts(builder: Callable, name: str) -> bool:
    try:
        return name in inspect.signature(builder).parameters
    except (TypeError, ValueError):
        return False


def source_model(reference: str, args: dict, *, check: bool = True) -> nn.Module:
    """The builder's model on the meta device, with the stem rule applied and (`check`) its output checked
    (`check_output`; a loader compares the structure first, the more telling difference)."""
    builder = resolve(reference)
    in_channels, num_classes, image_size = args["in_channels"], args["num_classes"], tuple(args["image_size"])
    if args.get("width", 1.0) != 1.0:
        raise MaskforgeError(
            f"width {args['width']:g}: architecture {reference} has fixed widths (pass the "
            f"builder's own width arguments in --arch-args)"
        )
    kwargs = dict(args.get("builder_args") or {})
    torchvision = reference.startswith("torchvision:")
    if torchvision and reference.split(":", 1)[1] in ("googlenet", "inception_v3"):
        # their auxiliary classifiers make the training forward return a tuple; init_weights: no warning
        kwargs.setdefault("aux_logits", False)
        kwargs.setdefault("init_weights", False)
    for key, value in (("num_classes", num_classes), ("in_channels", in_channels), ("image_size", list(image_size))):
        if key not in kwargs and (torchvision and key == "num_classes" or not torchvision and _accepts(builder, key)):
            kwargs[key] = value
    try:
        # the builder's own arithmetic runs on the CPU even under a meta default device (RegNet computes its
        # widths with tensors); its parameters go to the meta device as they are registered
        with torch.device("cpu"), _parameters_on_meta():
            model = builder(**kwargs)
    except MaskforgeError:
        raise
    except Exception as exc:  # noqa: BLE001 - a builder may refuse its arguments in any way
        raise MaskforgeError(
            f"architecture {reference} refused its arguments {kwargs}: {type(exc).__name__}: {first_line(exc)}"
        ) from None
    if not isinstance(model, nn.Module):
        raise MaskforgeError(f"architecture {reference} returned a {type(model).__name__}, not an nn.Module")
    model.to("meta")
    if torchvision and in_channels != 3:
        _adapt_stem(model, in_channels, reference)
    if check:
        check_output(model, reference, args)
    return model


@contextlib.contextmanager
def _parameters_on_meta():
    """Every parameter moves to the meta device as the builder registers it, so its initialization costs
    nothing and is never kept; everything else (the builder's own arithmetic) runs as usual."""
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param) -> None:
        register(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = nn.Parameter(param.detach().to("meta"), param.requires_grad)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def _adapt_stem(model: nn.Module, in_channels: int, reference: str) -> None:
    """torchvision's models take RGB: rebuild the first convolution (the stem) for the data's channels."""
    for name, module in model.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            if not isinstance(module, nn.Conv2d) or module.in_channels != 3:
                break
            with torch.device("meta"):
                stem = nn.Conv2d(
                    in_channels,
                    module.out_channels,
                    module.kernel_size,
                    module.stride,
                    module.padding,
                    module.dilation,
                    module.groups,
                    module.bias is not None,
                    module.padding_mode,
                )
            _replace(model, name, stem)
            return
    raise MaskforgeError(
        f"architecture {reference} does not start with a 3-channel convolution, so it cannot take "
        f"{in_channels}-channel images"
    )


def check_output(model: nn.Module, reference: str, args: dict) -> None:
    """One forward pass on the meta device: the network must map the data's images to its classes."""
    in_channels, num_classes, image_size = args["in_channels"], args["num_classes"], tuple(args["image_size"])
    was_training = model.training
    try:
        for training in (False, True):  # the search trains, the exports evaluate: both must give logits
            model.train(training)
            try:
                out = model(torch.empty(2, in_channels, *image_size, device="meta"))
            except Exception as exc:  # noqa: BLE001 - any failure of the user's forward
                raise MaskforgeError(
                    f"architecture {reference} cannot take {in_channels}x{image_size[0]}x"
                    f"{image_size[1]} images: {type(exc).__name__}: {first_line(exc)}"
                ) from None
            if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, num_classes):
                shape = list(out.shape) if isinstance(out, torch.Tensor) else f"a {type(out).__name__}"
                raise MaskforgeError(
                    f"architecture {reference} gives {shape} for a batch of 2 images in "
                    f"{'training' if training else 'evaluation'} mode, expected a tensor "
                    f"[2, {num_classes}] (one logit per class of the data)"
                )
    finally:
        model.train(was_training)


# --- structure --------------------------------------------------------------------------------------------


def structure_entries(model: nn.Module) -> list[str]:
    """One line per parameter and buffer, in module order: `name param|buffer AxBxC ModuleClass`."""
    entries = []
    for prefix, module in model.named_modules():
        kind = type(module).__name__
        for label, tensors in (
            ("param", module.named_parameters(recurse=False)),
            ("buffer", module.named_buffers(recurse=False)),
        ):
            for name, tensor in tensors:
                if tensor is None:
                    continue
                full = f"{prefix}.{name}" if prefix else name
                shape = "x".join(str(size) for size in tensor.shape) or "scalar"
                entries.append(f"{full} {label} {shape} {kind}")
    return entries


def structure_digest(entries: list[str]) -> str:
    """SHA-256 of the structure lines joined by newlines (UTF-8)."""
    return hashlib.sha256("\n".join(entries).encode("utf-8")).hexdigest()


def call_entries(model: nn.Module, args: dict) -> list[str]:
    """One line per module call in an evaluation-mode forward pass of one image on the meta device, in the
    order the calls end: `name ModuleClass output-shape` (FORMAT.md section 2.6). What the parameter and
    buffer listing cannot see: modules without tensors (an activation, a pooling) and the arguments that
    change shapes (stride, padding, kernel size)."""
    in_channels, image_size = args["in_channels"], tuple(args["image_size"])
    lines: list[str] = []

    def recorder(name: str):
        def record(module: nn.Module, inputs, output) -> None:
            lines.append(f"{name} {type(module).__name__} {_shapes(output)}")

        return record

    hooks = [module.register_forward_hook(recorder(name)) for name, module in model.named_modules() if name]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.empty(1, in_channels, *image_size, device="meta"))
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    return lines


def _shapes(output) -> str:
    """`AxBxC` for a tensor, comma-joined for a tuple or list of outputs, the type's name for anything else."""
    if isinstance(output, torch.Tensor):
        return "x".join(str(size) for size in output.shape) or "scalar"
    if isinstance(output, (tuple, list)):
        return ",".join(_shapes(item) for item in output)
    return type(output).__name__


def first_difference(recorded: list[str], current: list[str]) -> str:
    """The first line where two structures differ, in words."""
    for index, (old, new) in enumerate(zip(recorded, current)):
        if old != new:
            return f"entry {index}: recorded '{old}', the code now gives '{new}'"
    if len(recorded) > len(current):
        return f"entry {len(current)}: recorded '{recorded[len(current)]}', the code now gives nothing"
    if len(current) > len(recorded):
        return f"entry {len(recorded)}: the code now gives '{current[len(recorded)]}', not recorded"
    return "none"


def builder_record(reference: str, args: dict) -> dict:
    """What a search records of its builder, at its start (the artifact's `arch` and the checkpoint's
    `identity`: FORMAT.md section 2.6): `library`, `structure`, `structure_digest`; nothing for a
    registered name."""
    if not is_reference(reference):
        return {}
    source = source_model(reference, args)
    entries, calls = structure_entries(source), call_entries(source, args)
    return {
        "library": library_of(reference),
        "structure": entries,
        "structure_digest": structure_digest(entries),
        "calls": calls,
        "calls_digest": structure_digest(calls),
    }


def build_recorded(
    reference: str, args: dict, k: float, structure: list[str], library: str | None, calls: list[str] | None = None
) -> nn.Module:
    """The masked network of a builder reference whose structure (and, when recorded, its module calls)
    was recorded at search time (an artifact's or a checkpoint's), refused in one line naming the first
    difference when the code now builds or computes another: the masks and scores belong to the recorded
    network, not to whatever the code gives. (Records from before the call listing have `calls` None.)"""
    source = source_model(reference, args, check=False)
    current = structure_entries(source)
    if current != structure:
        raise MaskforgeError(
            f"architecture {reference} no longer builds the searched network "
            f"({first_difference(structure, current)}); rebuild it as it was at search time ({library})"
        )
    check_output(source, reference, args)
    if calls is not None:
        now = call_entries(source, args)
        if now != calls:
            raise MaskforgeError(
                f"architecture {reference} no longer computes the searched network (module calls, "
                f"{first_difference(calls, now)}); rebuild it as it was at search time ({library})"
            )
    return finish(convert(source, k, reference))


# --- the conversion rules ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class FixedRule:
    """What a parameter that is not a masked weight, bias or norm affine becomes: `value` ("zeros", "ones")
    or "normal" (regenerated from the seed: N(0, std^2), stream `<parameter name>`)."""

    owner: str  # the owning module's class (torchvision's)
    name: str  # the parameter's attribute name
    value: str
    std: float = 0.0
    why: str = ""


FIXED_RULES = (
    FixedRule("VisionTransformer", "class_token", "zeros", why="torchvision initializes it to 0"),
    FixedRule("Encoder", "pos_embedding", "normal", 0.02, why="torchvision's N(0, 0.02^2), from the seed"),
    FixedRule("CNBlock", "layer_scale", "ones", why="no learned scale, as the norms (torchvision: 1e-6)"),
)
_RULES = {(rule.owner, rule.name): rule for rule in FIXED_RULES}
_FIXED_ATTR = "_maskforge_fixed"  # on a module: {buffer name: FixedRule}
_NORMS = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm)


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def _masked_twin(module: nn.Module, k: float) -> nn.Module:
    if isinstance(module, nn.Linear):
        return MaskedLinear(module.in_features, module.out_features, k=k, device="meta")
    masked = {nn.Conv1d: MaskedConv1d, nn.Conv2d: MaskedConv2d, nn.Conv3d: MaskedConv3d}
    kind = next(base for base in masked if isinstance(module, base))
    return masked[kind](
        module.in_channels,
        module.out_channels,
        module.kernel_size,
        module.stride,
        module.padding,
        module.dilation,
        module.groups,
        k=k,
        padding_mode=module.padding_mode,
        device="meta",
    )


def _attention(module: nn.MultiheadAttention, name: str, k: float) -> ProjectedAttention:
    if not module._qkv_same_embed_dim or module.bias_k is not None:
        raise MaskforgeError(
            f"module {name}: only nn.MultiheadAttention with key and value of the query's size "
            f"and no bias_k/bias_v can be converted"
        )
    return ProjectedAttention(
        module.embed_dim,
        module.num_heads,
        dropout=0.0,
        add_zero_attn=module.add_zero_attn,
        batch_first=module.batch_first,
        k=k,
        device="meta",
    )


def _strip_affine(norm: nn.Module, name: str) -> None:
    """A norm without learned scale and shift (the paper's non-affine batch norm), in place."""
    if isinstance(norm, nn.modules.batchnorm._BatchNorm) and not norm.track_running_stats:
        raise MaskforgeError(
            f"module {name}: a batch norm without running statistics cannot be shipped (its "
            f"outputs would depend on the batch)"
        )
    if isinstance(norm, nn.modules.instancenorm._InstanceNorm) and norm.track_running_stats:
        raise MaskforgeError(f"module {name}: an instance norm with running statistics is not supported")
    if isinstance(norm, nn.modules.batchnorm._BatchNorm) and norm.momentum is not None:
        # PyTorch's default: torchvision's 0.01 (MobileNetV3, EfficientNet) leaves the running statistics
        # far from the data after a short search; a cumulative average (None) is kept as the builder chose
        norm.momentum = 0.1
    for attr in ("weight", "bias"):
        if attr in norm._parameters:
            norm.register_parameter(attr, None)
    for flag in ("affine", "elementwise_affine"):
        if hasattr(norm, flag):
            setattr(norm, flag, False)


def _is_off(module: nn.Module) -> bool:
    if isinstance(module, nn.modules.dropout._DropoutNd):
        return True
    try:
        from torchvision.ops import StochasticDepth
    except ImportError:  # pragma: no cover - torchvision is a dependency
        return False
    return isinstance(module, StochasticDepth)


def convert(model: nn.Module, k: float, reference: str = "the model") -> nn.Module:
    """Apply the conversion rules to `model` (on the meta device), in place; returns it."""
    replaced: list[str] = []
    for name, module in list(model.named_modules()):
        if any(name.startswith(prefix + ".") for prefix in replaced):
            continue  # inside a module already replaced (the projections of an attention)
        if isinstance(module, MASKED_TYPES + (ProjectedAttention,)):
            continue
        if isinstance(module, nn.MultiheadAttention):
            new: nn.Module = _attention(module, name, k)
        elif isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
            new = _masked_twin(module, k)
        elif _is_off(module):
            new = nn.Identity()
        else:
            if isinstance(module, _NORMS):
                _strip_affine(module, name)
            continue
        if not name:
            raise MaskforgeError(f"architecture {reference} is a single {type(module).__name__}; wrap it in a module")
        _replace(model, name, new)
        replaced.append(name)
    _fix_parameters(model, reference)
    return model


def _fix_parameters(model: nn.Module, reference: str) -> None:
    """Every remaining parameter follows a FIXED_RULES entry (then becomes a buffer) or refuses the model;
    every buffer must be a norm's statistics."""
    for prefix, module in model.named_modules():
        owner = type(module).__name__
        for attr, param in list(module._parameters.items()):
            if param is None or (isinstance(module, MASKED_TYPES) and attr == "scores"):
                continue
            full = f"{prefix}.{attr}" if prefix else attr
            rule = _RULES.get((owner, attr)) if type(module).__module__.startswith("torchvision.") else None
            if rule is None:
                raise MaskforgeError(
                    f"architecture {reference}: parameter {full} ({owner}.{attr}, shape "
                    f"{list(param.shape)}) has no conversion rule (docs/FORMAT.md section 2.6)"
                )
            del module._parameters[attr]
            module.register_buffer(attr, torch.zeros(param.shape, device="meta"))
            rules = getattr(module, _FIXED_ATTR, None) or {}
            rules[attr] = rule
            setattr(module, _FIXED_ATTR, rules)
        for attr, buffer in module._buffers.items():
            if buffer is None or attr in (getattr(module, _FIXED_ATTR, None) or {}):
                continue
            if isinstance(module, MASKED_TYPES) and attr == "weight":
                continue
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and attr in (
                "running_mean",
                "running_var",
                "num_batches_tracked",
            ):
                continue
            full = f"{prefix}.{attr}" if prefix else attr
            raise MaskforgeError(
                f"architecture {reference}: buffer {full} ({owner}.{attr}) is computed by the "
                f"model's constructor, which maskforge does not run; only norm statistics are "
                f"supported (docs/FORMAT.md section 2.6)"
            )


def fill_fixed(model: nn.Module, seed: int) -> None:
    """Set every fixed tensor (FIXED_RULES) of a converted model: constants, or regenerated from the seed."""
    with torch.no_grad():
        for prefix, module in model.named_modules():
            for attr, rule in (getattr(module, _FIXED_ATTR, None) or {}).items():
                buffer = getattr(module, attr)
                if buffer.device.type == "meta":
                    continue
                if rule.value == "normal":
                    name = f"{prefix}.{attr}" if prefix else attr
                    values = regen.normal(seed, name, tuple(buffer.shape), rule.std)
                    buffer.copy_(torch.from_numpy(values))
                else:
                    buffer.fill_(0.0 if rule.value == "zeros" else 1.0)


def fixed_tensors(model: nn.Module) -> dict[str, str]:
    """{tensor name: its rule in words} of a converted model's fixed tensors (inspect, docs)."""
    found = {}
    for prefix, module in model.named_modules():
        for attr, rule in (getattr(module, _FIXED_ATTR, None) or {}).items():
            what = f"N(0, {rule.std:g}^2) from the seed" if rule.value == "normal" else rule.value
            found[f"{prefix}.{attr}" if prefix else attr] = what
    return found


def finish(model: nn.Module) -> nn.Module:
    """Move a converted meta model to the current default device with zero weights and scores, reset norm
    statistics and zero fixed tensors (`fill_fixed` sets them from the seed); a no-op under meta."""
    device = torch.empty(()).device
    if device.type == "meta":
        return model
    model.to_empty(device=device)
    with torch.no_grad():
        for layer in masked_modules(model).values():
            layer.weight.zero_()
            layer.scores.zero_()
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.reset_running_stats()
            for attr in getattr(module, _FIXED_ATTR, None) or {}:
                getattr(module, attr).zero_()
    return model


def build(reference: str, args: dict, k: float) -> nn.Module:
    """The masked network of a builder reference (all-zero weights and scores, as `archs.build_structure`)."""
    model = source_model(reference, args)
    return finish(convert(model, k, reference))


# --- masked -> plain ---------------------------------------------------------------------------------------


def plain_layers(
    model: nn.Module,
    weight_of: Callable[[str, nn.Module], torch.Tensor] | None = None,
    device: torch.device | str | None = None,
) -> nn.Module:
    """Replace (in place) each masked layer with the plain bias-free layer of the same shape: the one
    definition of the masked -> plain swap (materialize, the dense baseline, the benchmarks).

    With `weight_of(name, layer)`, the plain layer's weight is that tensor (as a trainable parameter);
    otherwise it is created on `device` (default: the masked layer's device) and left for the caller to fill.
    """
    for name, layer in list(masked_modules(model).items()):
        target = device if device is not None else layer.weight.device
        if isinstance(layer, MaskedLinear):
            plain: nn.Module = nn.Linear(layer.in_features, layer.out_features, bias=False, device=target)
        else:
            base = next(kind for kind in (nn.Conv1d, nn.Conv2d, nn.Conv3d) if isinstance(layer, kind))
            plain = base(
                layer.in_channels,
                layer.out_channels,
                layer.kernel_size,
                layer.stride,
                layer.padding,
                layer.dilation,
                layer.groups,
                bias=False,
                padding_mode=layer.padding_mode,
                device=target,
            )
        if weight_of is not None:
            plain.weight = nn.Parameter(weight_of(name, layer))
        _replace(model, name, plain)
    return model


def count_weights(model: nn.Module) -> int:
    return sum(math.prod(layer.weight.shape) for layer in masked_modules(model).values())


def describe_reference(reference: str, args: dict) -> tuple[int, str]:
    """(masked weights, '') of a reference at `args`, or (0, why it cannot convert) — for `archs --all`."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # builders' deprecation notices: the listing is about conversion
            return count_weights(convert(source_model(reference, args), 0.5, reference)), ""
    except MaskforgeError as exc:
        return 0, str(exc).removeprefix(f"architecture {reference}: ").removeprefix(f"architecture {reference} ")
    except Exception as exc:  # noqa: BLE001 - a builder failing in a way source_model does not wrap
        return 0, f"{type(exc).__name__}: {first_line(exc)}"


def zoo(in_channels: int = 3, num_classes: int = 1000, image_size: tuple[int, int] = (224, 224)) -> list[dict]:
    """torchvision's classification builders at this input: `{name, weights, why}` each (`why` empty when
    the model converts; `weights` None when it does not). Builds each on the meta device (seconds)."""
    args = {
        "in_channels": int(in_channels),
        "num_classes": int(num_classes),
        "image_size": [int(image_size[0]), int(image_size[1])],
    }
    rows = []
    for name in torchvision_builders():
        weights, why = describe_reference(f"torchvision:{name}", args)
        rows.append({"name": f"torchvision:{name}", "weights": weights if not why else None, "why": why})
    return rows

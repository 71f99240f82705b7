"""The search configuration: every argument of `maskforge search`, defined once.

The CLI builds its options from these fields (names, types, help from the descriptions); the run folder
records them as `config.json`; the checkpoint embeds them. `None` means "not chosen": the architecture's
or the device's default applies, so a CLI default never overrides an architecture default.

Defaults are the paper's CIFAR settings (section 4, appendix B), except label smoothing: we use the
paper's ImageNet value 0.1 everywhere, because on the small demo set it narrows the train/held-out gap
(conv4 k=0.5: 97.0 % -> 97.5 % held-out; see BENCHMARKS.md). Pass 0 for the CIFAR recipe.
"""

from __future__ import annotations

import dataclasses
import functools
import typing
from typing import Any, Literal, Optional, Union

from pydantic import model_validator

from .artifact import MAX_SEED, Distribution, TopkRule
from .base import Field, Flag, Integer, Number, Text, parse, record

#: Options that a resumed search may change: they do not change what the search computes.
RESUME_OVERRIDABLE = ("workers", "checkpoint_every", "keep_checkpoint", "tensorboard")
#: Options that a resumed search may raise to extend the search (the cosine schedule then follows the new
#: length from the step reached: docs/SCALE.md, "Extending a search").
RESUME_EXTENDABLE = ("epochs", "max_steps")


@record(frozen=True, label="search config")
class SearchConfig:
    """Every argument of a search (`maskforge search --help` shows the same text).

    >>> SearchConfig(arch="fc", k=0.3).k
    0.3
    """

    arch: Text = Field(
        "conv4",
        description="Architecture to search (see `maskforge archs`), or a builder: "
        "torchvision:NAME (`maskforge archs --all`), package.module:callable or file.py:callable "
        "(README, 'Bring your own model').",
    )
    arch_args: Optional[Text] = Field(
        None,
        description="The builder's keyword arguments as a JSON object, e.g. "
        "'{\"num_layers\": 2}' (builder references only).",
    )
    k: Number = Field(0.5, gt=0, le=1, description="Fraction of weights KEPT in every layer, in (0, 1].")
    data: Text = Field(
        "mnist5k",
        description="mnist5k (built-in demo), fashion-mnist (Debian's "
        "dataset-fashion-mnist or $MASKFORGE_DATA), or a CIFAR-10 / "
        "MNIST IDX / image folder (train/ + val/ class subfolders).",
    )
    epochs: Integer = Field(10, ge=1, description="Passes over the training split.")
    max_steps: Optional[Integer] = Field(None, ge=1, description="Stop after this many optimizer steps (smoke runs).")
    batch_size: Integer = Field(
        128,
        ge=1,
        description="GLOBAL images per step: under torchrun each of N "
        "processes takes batch-size/N (N must divide it). The lr belongs to this "
        "global batch and is not rescaled by N.",
    )
    lr: Number = Field(
        0.1,
        gt=0,
        description="Peak learning rate of the scores (warm-up, then cosine decay to 0), for the global batch.",
    )
    momentum: Number = Field(0.9, ge=0, lt=1, description="SGD momentum.")
    weight_decay: Number = Field(1e-4, ge=0, description="Weight decay on the scores (the only parameters).")
    label_smoothing: Number = Field(
        0.1, ge=0, lt=1, description="Label smoothing (the paper's ImageNet value; 0 gives its CIFAR recipe)."
    )
    warmup_epochs: Integer = Field(0, ge=0, description="Epochs of linear warm-up before the cosine decay.")
    seed: Integer = Field(
        0, ge=0, le=MAX_SEED, description="Seed of the random weights and scores; the artifact stores it."
    )
    init: Distribution = Field(
        "signed_constant", description="Weight distribution: signed_constant, kaiming_normal or unsigned_constant."
    )
    scale_fan: Flag = Field(False, description="Use sigma = sqrt(2/(k*fan_in)) (the subnetwork's fan-in).")
    width: Optional[Number] = Field(
        None,
        gt=0,
        le=64,
        description="Width multiplier W of the conv and fc "
        "networks: each hidden layer gets max(1, round(W x its units)); the ResNets "
        "take only 1 (default: the architecture's, 1).",
    )
    topk: TopkRule = Field(
        "layer",
        description="Top-k rule: layer (k in every layer, the paper's) or global "
        "(one threshold over all layers, each keeps at least 1).",
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="auto (CUDA when present), cpu or cuda; under torchrun each process uses cuda:LOCAL_RANK."
    )
    precision: Optional[Literal["fp32", "bf16"]] = Field(
        None, description="Autocast precision of the network (default: bf16 on CUDA, fp32 on CPU)."
    )
    channels_last: Optional[Flag] = Field(
        None, description="channels_last memory format for conv nets (default: on CUDA only)."
    )
    masker: Optional[Literal["numpy", "torch"]] = Field(
        None, description="Top-k implementation (default: the fastest for the device)."
    )
    compile: Flag = Field(
        False, description="torch.compile the model (worth it on GPU for long searches; the first steps are slow)."
    )
    deterministic: Flag = Field(
        False,
        description="Deterministic kernels: no cuDNN autotuning, no TF32, "
        "torch.use_deterministic_algorithms (slower on GPU).",
    )
    workers: Optional[Integer] = Field(
        None, ge=0, description="Data-loader processes for image folders (default: min(8, cores / processes per node))."
    )
    image_size: Optional[Integer] = Field(None, ge=1, description="Image folders: resize images to this side.")
    checkpoint_every: Optional[Integer] = Field(
        None,
        ge=1,
        description="Also write DIR/checkpoint.safetensors "
        "every N optimizer steps (it is always written at the end of "
        "every epoch).",
    )
    out: Optional[Text] = Field(
        None,
        description="Run folder (default: runs/<arch>-k<k>-s<seed>, numbered "
        "-2, -3, ... when taken). A folder holding a finished search is refused unless "
        "--overwrite; an unfinished search there with the same arguments is continued.",
    )
    keep_checkpoint: Flag = Field(
        False,
        description="Keep checkpoint.safetensors when the search finishes "
        "(it is removed by default); a kept checkpoint lets --resume DIR --epochs N "
        "extend the finished search.",
    )
    tensorboard: Flag = Field(
        False,
        description="Also write TensorBoard event files to <out>/tensorboard "
        "(needs the tensorboard package: pip install 'maskforge[tensorboard]').",
    )

    @model_validator(mode="after")
    def _builder_args(self) -> "SearchConfig":
        if self.arch_args is not None:
            from ..registry import parse_builder_args

            try:
                parse_builder_args(self.arch_args, "arch_args")
            except Exception as exc:  # MaskforgeError: reported with the field's name
                raise ValueError(str(exc)) from None
            if ":" not in self.arch:
                raise ValueError(
                    f"arch_args applies to builder references (torchvision:NAME, module:callable, "
                    f"file.py:callable), not to the registered architecture {self.arch}"
                )
        return self

    def builder_args(self) -> dict | None:
        """`arch_args` as a dict (None when not given)."""
        from ..registry import parse_builder_args

        return parse_builder_args(self.arch_args) or None if self.arch_args is not None else None

    @model_validator(mode="after")
    def _warmup_fits(self) -> "SearchConfig":
        if self.warmup_epochs and self.warmup_epochs >= self.epochs:
            raise ValueError(f"warmup_epochs ({self.warmup_epochs}) must be smaller than epochs ({self.epochs})")
        return self

    def to_dict(self) -> dict:
        """Every field, defaults included (what `config.json` records)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Any, label: str = "search config") -> "SearchConfig":
        """A config from recorded values; fields missing from an older record take their defaults."""
        return parse(cls, values, label)

    def replace(self, **changes: Any) -> "SearchConfig":
        """A copy with some fields changed (validated)."""
        return dataclasses.replace(self, **changes)


@functools.lru_cache(maxsize=None)
def field_kind(name: str) -> tuple[type, bool]:
    """The plain Python type of SearchConfig field `name` (int, float, str or bool; a choice is the type of
    its values) and whether it may be None: what the command line and a sweep's grid read a value as."""
    hint, optional = typing.get_type_hints(SearchConfig)[name], False  # Annotated[...] already unwrapped
    while True:
        origin = typing.get_origin(hint)
        if origin is Union:  # Optional[X]
            args = typing.get_args(hint)
            optional = optional or type(None) in args
            hint = next(arg for arg in args if arg is not type(None))
        elif origin is Literal:
            return type(typing.get_args(hint)[0]), optional
        else:
            return hint, optional

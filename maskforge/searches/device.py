"""Where and how the search computes: the device, autocast precision, memory format, masker, compilation,
backend switches, and feeding batches to the device.

`Accelerator.resolve(config, device, model)` turns the config's `None`s ("the device's default") into
concrete choices, which the provenance records: on CUDA the fast recipe (bf16 autocast where the GPU has
bfloat16, channels_last for conv nets, the torch masker, cuDNN autotuning + TF32 unless `deterministic`),
on the CPU fp32, the standard layout and the numpy masker. Any choice can be forced on the CPU, so a CPU
search can run the exact code a GPU search runs, device aside (docs/DETERMINISM.md). Choices the machine
cannot honour (bf16 on a GPU without it, `compile` without a compiler toolchain) are refused here with a
`MaskforgeError`, before the search writes anything.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
from dataclasses import dataclass
from typing import Iterable, Iterator

import torch
import torch.nn as nn

from ..data import normalize
from ..errors import MaskforgeError
from ..schema import InputSpec, SearchConfig

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# What PyTorch says when an operation has no deterministic kernel (RuntimeError, also inside compiled code).
_NOT_DETERMINISTIC = " does not have a deterministic implementation"
_CUBLAS_NOT_DETERMINISTIC = "CUBLAS_WORKSPACE_CONFIG"


def resolve_device(choice: str) -> torch.device:
    """The device a config's `device` names (`auto`: CUDA when present)."""
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise MaskforgeError("device 'cuda' was requested but CUDA is not available on this machine")
    return torch.device(choice)


def uses_conv(model: nn.Module) -> bool:
    return any(p.dim() == 4 for p in model.parameters())


def bf16_supported(device: torch.device) -> bool:
    """Whether autocast can compute in bfloat16 on `device`: every CPU (PyTorch emulates it where AVX-512
    BF16 / AMX are absent, slowly but exactly as specified); GPUs from compute capability 8.0 (Ampere) on."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    return device.type == "cpu"


def compile_toolchain_problem(device_type: str) -> str | None:
    """Why `torch.compile` (inductor) cannot build its kernels for `device_type` here; None when it can.

    On the CPU inductor compiles C++ with `$CXX` (default g++; clang++ on macOS); on CUDA it generates
    Triton kernels, whose launchers Triton builds with `$CC` (default gcc or clang)."""
    if device_type == "cuda":
        try:
            import triton  # noqa: F401
        except ImportError:
            return "needs Triton (inductor's GPU code generator), which is not installed (pip install triton)"
        return _missing_compiler("CC", ("gcc", "clang"), "a C compiler for Triton's kernel launchers")
    return _missing_compiler(
        "CXX", ("clang++" if sys.platform == "darwin" else "g++",), "a C++ compiler for inductor's CPU kernels"
    )


def _missing_compiler(variable: str, defaults: tuple[str, ...], what: str) -> str | None:
    chosen = os.environ.get(variable)
    if chosen:
        if shutil.which(chosen) is None:
            return f"needs {what}: {variable}={chosen} names no program that exists on this machine"
        return None
    if any(shutil.which(name) for name in defaults):
        return None
    return f"needs {what} ({' or '.join(defaults)} on PATH, or {variable}), and none was found"


@dataclass(frozen=True)
class Accelerator:
    """The concrete computing choices of one search."""

    device: torch.device
    precision: str  # "fp32" | "bf16": the autocast dtype of the network's forward/backward
    channels_last: bool  # inputs, weights and scores in channels_last (conv nets)
    masker: str  # "numpy" | "torch": the top-k implementation (maskforge.topk)
    compile: bool  # the training model runs under torch.compile (inductor)
    deterministic: bool  # deterministic kernels, no autotuning, no TF32

    @staticmethod
    def check(config: SearchConfig, device: torch.device) -> None:
        """Refuse the choices this machine cannot honour (cheap: no data, no model needed)."""
        if config.precision == "bf16" and not bf16_supported(device):
            raise MaskforgeError(
                f"precision 'bf16' was requested but device {device} has no bfloat16 support (a "
                f"GPU of compute capability 8.0 or newer has it); use precision fp32"
            )
        if config.compile:
            problem = compile_toolchain_problem(device.type)
            if problem is not None:
                raise MaskforgeError(f"compile on {device.type} {problem}; install it, or leave compile off")

    @classmethod
    def resolve(cls, config: SearchConfig, device: torch.device, model: nn.Module) -> "Accelerator":
        cls.check(config, device)
        cuda = device.type == "cuda"
        precision = config.precision or ("bf16" if cuda and bf16_supported(device) else "fp32")
        channels_last = (cuda if config.channels_last is None else config.channels_last) and uses_conv(model)
        # The numpy masker cannot be traced: a compiled search uses the torch one unless told otherwise.
        masker = config.masker or ("torch" if device.type != "cpu" or config.compile else "numpy")
        return cls(device, precision, channels_last, masker, bool(config.compile), bool(config.deterministic))

    def provenance(self) -> dict:
        """The choices as the artifact's provenance records them."""
        return {
            "device": self.device.type,
            "precision": self.precision,
            "channels_last": self.channels_last,
            "masker": self.masker,
            "compile": self.compile,
            "deterministic": self.deterministic,
        }

    def autocast(self):
        if self.precision == "fp32":
            return torch.autocast(self.device.type, enabled=False)
        return torch.autocast(self.device.type, dtype=_DTYPES[self.precision])

    def prepare_model(self, model: nn.Module) -> nn.Module:
        model.to(self.device)
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        return model

    def inputs(self, images: torch.Tensor, spec: InputSpec) -> torch.Tensor:
        """Normalize a uint8 batch already on the device (the loader ships compact uint8 images)."""
        x = normalize(images, spec)
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    @contextlib.contextmanager
    def backend_settings(self) -> Iterator[None]:
        """The cuDNN/TF32/determinism switches for the duration of the search, restored afterwards.

        With `deterministic`, an operation that has no deterministic kernel stops the search with a
        `MaskforgeError` naming it (PyTorch raises a RuntimeError; nothing was written by then that a
        failed step could spoil)."""
        cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
        saved = (
            cudnn.benchmark,
            cudnn.deterministic,
            cudnn.allow_tf32,
            matmul.allow_tf32,
            torch.are_deterministic_algorithms_enabled(),
            torch.is_deterministic_algorithms_warn_only_enabled(),
        )
        if self.deterministic:
            # cuBLAS is deterministic only with a fixed workspace (read when its first handle is made).
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            cudnn.benchmark, cudnn.deterministic, cudnn.allow_tf32, matmul.allow_tf32 = False, True, False, False
            torch.use_deterministic_algorithms(True)
        elif self.device.type == "cuda":
            cudnn.benchmark, matmul.allow_tf32 = True, True
        try:
            yield
        except RuntimeError as exc:
            if self.deterministic:
                refusal = deterministic_refusal(exc, self.device)
                if refusal is not None:
                    raise refusal from None
            raise
        finally:
            cudnn.benchmark, cudnn.deterministic, cudnn.allow_tf32, matmul.allow_tf32 = saved[:4]
            torch.use_deterministic_algorithms(saved[4], warn_only=saved[5])


def deterministic_refusal(exc: BaseException, device: torch.device) -> MaskforgeError | None:
    """The user-facing error for PyTorch's "no deterministic kernel" RuntimeError (None for any other)."""
    text = str(exc)
    at = text.find(_NOT_DETERMINISTIC)
    if at >= 0:
        operation = text[:at].rsplit(None, 1)[-1] if text[:at].strip() else "an operation"
        return MaskforgeError(
            f"deterministic: the operation {operation} of this search has no deterministic "
            f"implementation on {device.type} in PyTorch {torch.__version__.split('+')[0]}; "
            f"leave deterministic off for this search"
        )
    if _CUBLAS_NOT_DETERMINISTIC in text:
        return MaskforgeError(
            "deterministic: cuBLAS needs CUBLAS_WORKSPACE_CONFIG=:4096:8 set before CUDA starts "
            "in this process; set it in the environment and start again"
        )
    return None


def on_device(batches: Iterable, device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Batches on `device`, the (non-blocking) copy of the next batch issued before the current one is
    handed out: on CUDA the host prepares batch i+1 while the GPU still works on batch i; on the CPU the
    copies are no-ops and the code path is the same."""
    iterator = iter(batches)
    try:
        pending = None
        for images, labels in iterator:
            ready = (images.to(device, non_blocking=True), labels.to(device, non_blocking=True))
            if pending is not None:
                yield pending
            pending = ready
        if pending is not None:
            yield pending
    finally:
        close = getattr(iterator, "close", None)
        if close is not None:
            close()  # stops data-loader workers now, not at some later garbage collection

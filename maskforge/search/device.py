"""Where and how the search computes: the device, autocast precision, memory format, backend switches, and
feeding batches to the device.

`Accelerator.resolve(config, device, model)` turns the config's `None`s ("the device's default") into
concrete choices, which the provenance records: bf16 autocast and channels_last on CUDA, fp32 and the
standard layout on the CPU (today's behaviour), cuDNN autotuning + TF32 on CUDA unless `deterministic`.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Iterable, Iterator

import torch
import torch.nn as nn

from ..data import normalize
from ..errors import MaskforgeError
from ..schema import InputSpec, SearchConfig

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def resolve_device(choice: str) -> torch.device:
    """The device a config's `device` names (`auto`: CUDA when present)."""
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise MaskforgeError("device 'cuda' was requested but CUDA is not available on this machine")
    return torch.device(choice)


def uses_conv(model: nn.Module) -> bool:
    return any(p.dim() == 4 for p in model.parameters())


@dataclass(frozen=True)
class Accelerator:
    """The concrete computing choices of one search."""

    device: torch.device
    precision: str          # "fp32" | "bf16": the autocast dtype of the network's forward/backward
    channels_last: bool     # inputs, weights and scores in channels_last (conv nets)
    deterministic: bool     # deterministic kernels, no autotuning, no TF32

    @classmethod
    def resolve(cls, config: SearchConfig, device: torch.device, model: nn.Module) -> "Accelerator":
        cuda = device.type == "cuda"
        precision = config.precision or ("bf16" if cuda else "fp32")
        channels_last = (cuda if config.channels_last is None else config.channels_last) and uses_conv(model)
        return cls(device, precision, channels_last, config.deterministic)

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
        """The cuDNN/TF32/determinism switches for the duration of the search, restored afterwards."""
        cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
        saved = (cudnn.benchmark, cudnn.deterministic, cudnn.allow_tf32, matmul.allow_tf32,
                 torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
        if self.deterministic:
            # cuBLAS is deterministic only with a fixed workspace (read when its first handle is made).
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            cudnn.benchmark, cudnn.deterministic, cudnn.allow_tf32, matmul.allow_tf32 = False, True, False, False
            # warn_only: an op without a deterministic kernel (kthvalue on CUDA) warns instead of failing.
            torch.use_deterministic_algorithms(True, warn_only=True)
        elif self.device.type == "cuda":
            cudnn.benchmark, matmul.allow_tf32 = True, True
        try:
            yield
        finally:
            cudnn.benchmark, cudnn.deterministic, cudnn.allow_tf32, matmul.allow_tf32 = saved[:4]
            torch.use_deterministic_algorithms(saved[4], warn_only=saved[5])


def on_device(batches: Iterable, device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Batches on `device`. On CUDA the (pinned, non-blocking) copy of the next batch is issued before the
    current one is handed out, so the host prepares batch i+1 while the GPU still works on batch i."""
    iterator = iter(batches)
    try:
        if device.type != "cuda":
            yield from iterator
            return
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

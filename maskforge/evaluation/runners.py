"""Callables that turn a normalized float32 batch `[B, C, H, W]` into logits `[B, classes]`.

`OnnxRunner` wraps an onnxruntime session. When the ONNX file came from the user (foreign, edited or
damaged, or run with a `size`/`mean`/`std` override), a failure inside onnxruntime is the input's fault and
becomes one `MaskforgeError`; for a file this process exported from an artifact it stays a bug.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch
import torch.nn as nn

from ..errors import MaskforgeError
from ..export import ort_message, ort_session
from .subject import Subject


def onnxruntime_errors() -> tuple[type[BaseException], ...]:
    """onnxruntime's exception types for a model that cannot run on the inputs it was given."""
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    return tuple(
        getattr(state, name)
        for name in ("Fail", "InvalidArgument", "RuntimeException", "NotImplemented", "InvalidGraph")
        if hasattr(state, name)
    )


class OnnxRunner:
    """`runner(x)` -> logits from onnxruntime (CPU, default options except the thread count)."""

    def __init__(self, subject: Subject, threads: int | None = None) -> None:
        self.subject = subject
        self.session = ort_session(subject.onnx_path, threads=threads)
        self.input_name = self.session.get_inputs()[0].name
        self.user_input = not subject.exported_here
        self._errors = onnxruntime_errors()

    def __call__(self, x: np.ndarray) -> np.ndarray:
        try:
            return self.session.run(None, {self.input_name: x})[0]
        except self._errors as exc:
            if not self.user_input:
                raise
            hint = (
                "the model does not fit the preprocessing given: check size, mean and std"
                if self.subject.preprocessing != "metadata"
                else "its graph does not fit its own maskforge metadata: a damaged or edited file?"
            )
            raise MaskforgeError(
                f"onnxruntime cannot run {self.subject.path} on a float32 batch of shape "
                f"{list(x.shape)}: {ort_message(exc)} ({hint})"
            ) from None


class TorchRunner:
    """`runner(x)` -> logits from a PyTorch module (eval mode, no autograd)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model.eval()

    def __call__(self, x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return self.model(torch.from_numpy(x)).float().numpy()


@contextlib.contextmanager
def torch_threads(threads: int):
    """PyTorch's intra-op thread count set to `threads` for the block, restored after."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)

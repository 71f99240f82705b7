"""The output checks every export (and `verify`) runs.

* `float_parity`: an fp32 file against the PyTorch model on a fixed random batch. The bound is
  *relative* to the size of the logits: `max |ort - torch| <= PARITY_RTOL * max(1, max |torch|)`. A
  fixed absolute bound refused valid networks with large logits (an unsigned-constant conv2 gives
  logits near 9,400, where one float32 step is already 1e-3).
* `int8_parity`: an int8 (QDQ) file's integer kernels against the same graph run in float, kernel by
  kernel (`kernels.check_kernels`: rounding only, which catches kernels that overflow or saturate).
  Then its top-1 and argmax agreement against the fp32 network on held-out images.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn as nn

from ..data import InputSpec
from ..errors import MaskforgeError
from .kernels import KernelCheck, check_kernels
from .sessions import ort_session, run_session

if TYPE_CHECKING:  # onnxruntime itself loads only when a session is made
    import onnxruntime

PARITY_RTOL = 1e-4  # fp32: max |ort - torch| <= PARITY_RTOL * max(1, max |torch logits|)
PARITY_BATCH = 4  # images in the fixed random batch
PARITY_SEED = 20200601  # its torch.Generator seed (the batch need not be portable)
INT8_MAX_TOP1_DROP = 1.0  # int8: held-out top-1 may be at most this many points below fp32
INT8_MIN_AGREEMENT = 0.95  # int8: and predict the fp32 network's class for at least this share of images
KERNEL_CHECK_IMAGES = 128  # int8: images run both optimized and unoptimized (the latter is slow)


def parity_inputs(spec: InputSpec, batch: int = PARITY_BATCH, seed: int = PARITY_SEED) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, spec.channels, spec.height, spec.width, generator=generator)


@dataclass
class Parity:
    """How one file's outputs compared with the reference: None as `failure` when they agree."""

    max_abs_diff: float
    tolerance: float
    failure: str | None = None

    def raise_for_failure(self) -> "Parity":
        if self.failure is not None:
            raise MaskforgeError(self.failure)
        return self


def compare_logits(got: np.ndarray, expected: np.ndarray, rtol: float = PARITY_RTOL) -> Parity:
    """Max abs difference within `rtol * max(1, max |expected|)`, and the same predicted classes (except
    where the reference's two best logits are closer than the tolerance: a tie within rounding)."""
    if got.shape != expected.shape:
        return Parity(
            float("inf"),
            0.0,
            f"onnxruntime output shape {list(got.shape)} differs from PyTorch's {list(expected.shape)}",
        )
    scale = float(np.abs(expected).max()) if expected.size else 0.0
    tolerance = rtol * max(1.0, scale)
    diff = float(np.abs(got.astype(np.float64) - expected).max()) if got.size else 0.0
    if not np.isfinite(diff) or diff > tolerance:
        return Parity(
            diff,
            tolerance,
            f"onnxruntime and PyTorch disagree: max abs difference {diff:.3g} > "
            f"{tolerance:.3g} ({rtol:g} x the largest logit, at least {rtol:g})",
        )
    for row in range(expected.shape[0]):
        if got[row].argmax() != expected[row].argmax() and _top_gap(expected[row]) > tolerance:
            return Parity(diff, tolerance, f"onnxruntime and PyTorch predict different classes for example {row}")
    return Parity(diff, tolerance)


def float_parity(
    path: str | os.PathLike | bytes | "onnxruntime.InferenceSession", model: nn.Module, spec: InputSpec
) -> Parity:
    """Run an fp32 ONNX file (default session options; or an open session of one) and the PyTorch model
    on the fixed batch."""
    x = parity_inputs(spec)
    with torch.no_grad():
        expected = model(x).float().numpy()
    session = path if hasattr(path, "get_inputs") else ort_session(path)
    if len(session.get_inputs()) != 1:
        return Parity(float("inf"), 0.0, f"the ONNX model has {len(session.get_inputs())} inputs, expected 1")
    return compare_logits(run_session(session, x.numpy()), expected)


@dataclass
class Int8Check:
    """The int8 file's figures: kernels against float simulation, accuracy against fp32."""

    kernels: KernelCheck  # integer kernels vs the graph run in float, kernel by kernel
    output_max_abs_diff: float  # the logits, optimized vs unoptimized (reported, not bounded)
    top1: float | None  # held-out top-1 of the int8 file
    reference_top1: float | None  # held-out top-1 of the fp32 network on the same images
    argmax_agreement: float | None
    examples: int


def int8_parity(
    path: str | os.PathLike,
    images: np.ndarray,
    labels: np.ndarray | None,
    reference_logits: np.ndarray,
    *,
    max_top1_drop: float = INT8_MAX_TOP1_DROP,
    min_agreement: float = INT8_MIN_AGREEMENT,
) -> Int8Check:
    """Check an int8 file on normalized `images` (with `labels` when known) or raise `MaskforgeError`."""
    kernels = check_kernels(path, images[:KERNEL_CHECK_IMAGES])
    fused = run_session(ort_session(path), images)
    # end to end, for the record: one-step roundings add up through a deep network (kernels.py)
    output_diff = float(np.abs(fused[: len(kernels.float_output)].astype(np.float64) - kernels.float_output).max())
    agreement = float((fused.argmax(1) == reference_logits.argmax(1)).mean())
    top1 = reference_top1 = None
    if labels is not None:
        top1 = float((fused.argmax(1) == labels).mean())
        reference_top1 = float((reference_logits.argmax(1) == labels).mean())
        drop = 100.0 * (reference_top1 - top1)
        if drop > max_top1_drop:
            raise MaskforgeError(
                f"int8 top-1 {100 * top1:.2f} % is {drop:.2f} points below fp32's "
                f"{100 * reference_top1:.2f} % on {len(labels)} held-out images (at most "
                f"{max_top1_drop:g} allowed); the int8 file was not written"
            )
    if agreement < min_agreement:
        raise MaskforgeError(
            f"int8 predicts the fp32 network's class for only {100 * agreement:.1f} % of "
            f"{len(images)} held-out images (at least {100 * min_agreement:g} % required); "
            f"the int8 file was not written"
        )
    return Int8Check(kernels, output_diff, top1, reference_top1, agreement, len(images))


def _top_gap(row: np.ndarray) -> float:
    if row.size < 2:
        return float("inf")
    top = np.sort(row)[-2:]
    return float(top[1] - top[0])

"""The materialized network -> an ONNX graph, with PyTorch's TorchScript-based exporter.

That exporter needs no extra packages and, with constant folding, folds each batch norm into the
convolution before it, so the graph's weights are the *deployed* ones (`weight x mask x bn_scale`).
"""

from __future__ import annotations

import io
import warnings

import torch
import torch.nn as nn

from ..data import InputSpec
from ..errors import MaskforgeError, first_line

INPUT_NAME, OUTPUT_NAME = "input", "logits"


def trace_to_onnx(model: nn.Module, spec: InputSpec, opset: int):
    """An `onnx.ModelProto` of `model` with a dynamic batch axis, input `input` and output `logits`."""
    import onnx

    example = torch.zeros(1, spec.channels, spec.height, spec.width)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # The TorchScript exporter is deprecated in favour of the dynamo one, which needs onnxscript.
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(
                model,
                (example,),
                buffer,
                dynamo=False,
                opset_version=opset,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                do_constant_folding=True,
            )
        except TypeError as exc:  # pragma: no cover - a torch without the TorchScript exporter
            raise MaskforgeError(
                f"this PyTorch ({torch.__version__}) cannot export ONNX with the TorchScript "
                f"exporter ({first_line(exc)})"
            ) from None
    return onnx.load_from_string(buffer.getvalue())

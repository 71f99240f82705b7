"""`export_onnx`: artifact -> checked ONNX file, in any storage x precision (see `modes`).

The steps, each in its own module: materialize the network, trace it (`trace`, batch norm folded),
quantize it (`int8`, precision int8), encode its weights (`compact` or `regen_graph`), record what it
is (`metadata`), and check the result in onnxruntime (`parity`) before it is renamed into place.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch.nn as nn

from ..artifact import Artifact
from ..errors import MaskforgeError
from ..fileio import atomic_path
from ..materialization import as_artifact, materialize
from ..memory import check_network_fits
from ..exportchoices import DEFAULT_CALIBRATION
from .calibration import (
    DEFAULT_CHECK_IMAGES,
    CheckImages,
    check_calibration_count,
    load_check_images,
)
from .compact import compact_weights
from .int8 import QuantizeInfo, ScratchFull, check_int8_weights, quantize
from .metadata import set_metadata, with_digest
from .destination import check_output_path, output_folder
from .modes import ExportMode, default_export_path, resolve_mode
from ..sizes import bits_per_weight
from .onnxio import MAX_IR_VERSION, finalize
from .parity import (
    INT8_MAX_TOP1_DROP,
    INT8_MIN_AGREEMENT,
    PARITY_BATCH,
    Int8Check,
    Parity,
    float_parity,
    int8_parity,
)
from .sessions import ort_session, run_session
from .regen_graph import regen_weights
from .trace import trace_to_onnx


@dataclass
class ExportResult:
    """What an export wrote and how it checked out (None where a figure does not apply)."""

    path: Path
    format: str  # "onnx" | "torch"
    file_bytes: int
    masked_weights: int
    kept_weights: int
    bits_per_weight: float  # 8 * file_bytes / masked_weights
    seconds: float
    max_abs_diff: float | None = None  # fp32: vs PyTorch; int8: logits, integer kernels vs the graph run in float
    opset: int | None = None
    storage: str | None = None  # "dense" | "compact" | "regen" (ONNX)
    precision: str | None = None  # "fp32" | "int8" (ONNX)
    parity_tolerance: float | None = None  # the bound max_abs_diff was held to (fp32; int8 bounds each kernel)
    kernel_max_steps: int | None = None  # int8: worst kernel vs float on the same inputs, in quantization steps
    lossy: bool = False  # int8 of weights int8 cannot hold exactly (explicitly allowed)
    int8_weight_max_error: float | None = None  # max |dequantized int8 - fp32 weight|: 0.0 when exact
    calibration_data: str | None = None
    calibration_images: int | None = None
    top1: float | None = None  # int8: held-out top-1 of the file ...
    reference_top1: float | None = None  # ... and of the fp32 network on the same images
    argmax_agreement: float | None = None
    check_examples: int | None = None

    def to_dict(self) -> dict:
        out = asdict(self)
        out["path"] = str(self.path)
        return out


@dataclass(frozen=True)
class Int8Options:
    """How an int8 export is calibrated and checked (an fp32 export ignores them)."""

    calibration: int = DEFAULT_CALIBRATION  # training images the activation ranges are calibrated on
    data: str | None = None  # any `maskforge search --data` source; default: the artifact's own
    check_images: int = DEFAULT_CHECK_IMAGES  # held-out images (at most) the file is checked on
    max_top1_drop: float = INT8_MAX_TOP1_DROP  # top-1 points the file may lose against fp32
    min_agreement: float = INT8_MIN_AGREEMENT  # fraction of the images that must keep the fp32 class
    #: `load_check_images` of an earlier int8 export of the same artifact: loaded, decoded and referenced
    #: once for several exports (as `eval --compare` does)
    prepared: CheckImages | None = None


def export_onnx(
    artifact: Artifact | str | os.PathLike,
    out: str | os.PathLike | None = None,
    *,
    storage: str | None = None,
    precision: str = "fp32",
    opset: int | None = None,
    allow_lossy: bool = False,
    int8: Int8Options = Int8Options(),
    check: bool = True,
    threads: int | None = None,
    model: nn.Module | None = None,
) -> ExportResult:
    """Write the artifact's network as an ONNX file and check it in onnxruntime before keeping it.

    `storage` is "dense", "compact" or "regen" (default: regen where possible, else compact), `precision`
    "fp32" or "int8". int8 calibrates and checks as `int8` says (`Int8Options`): calibrated on training
    images, checked on the held-out split (top-1 within `max_top1_drop` points of fp32, the fp32 class
    kept for at least `min_agreement` of the images). `model` may pass an already materialized network.
    Every failure raises `MaskforgeError` and leaves nothing behind.

    >>> result = export_onnx("runs/demo/artifact.safetensors", precision="int8")   # doctest: +SKIP
    >>> result.path.name, result.bits_per_weight < 1.2                             # doctest: +SKIP
    ('artifact.int8.onnx', True)
    """
    started = time.perf_counter()
    artifact = with_digest(as_artifact(artifact))
    mode = resolve_mode(artifact, storage, precision, opset, allow_lossy=allow_lossy)
    if mode.precision == "int8":
        check_calibration_count(int8.calibration)
    out = (
        Path(out)
        if out is not None
        else default_export_path(artifact.path, storage=mode.storage, precision=mode.precision)
    )
    check_output_path(out)
    if model is None:
        model = materialize(artifact, threads=threads)
    # before anything runs the network (tracing, the parity checks: up to 256 images at once for int8)
    batch = PARITY_BATCH if mode.precision == "fp32" else min(256, int8.check_images)
    check_network_fits(model, artifact.spec, batch, f"exporting {artifact.path or 'the artifact'}")
    images = None
    if mode.precision == "int8":
        images = int8.prepared or load_check_images(artifact, int8.data, int8.calibration, int8.check_images)
    if mode.lossy:
        warnings.warn(
            f"int8 of {artifact.init} weights is lossy: the file approximates the artifact's network "
            f"(checked against fp32 top-1 on held-out data)",
            UserWarning,
            stacklevel=2,
        )
    try:
        proto, quantized, fp32 = _build(artifact, model, mode, images)
    except ScratchFull as exc:
        raise MaskforgeError(f"cannot write {out}: {exc}; the previous {out.name}, if any, is unchanged") from None
    figures: dict = {"lossy": mode.lossy}  # what the checks found: ExportResult fields, recorded in the file
    if quantized is not None:
        figures.update(
            int8_weight_max_error=quantized.weight_max_error,
            calibration_data=images.source,
            calibration_images=quantized.calibration_images,
        )
    with output_folder(out), atomic_path(out) as tmp:
        tmp.write_bytes(proto.SerializeToString())
        if check and images is not None:
            reference = _reference(fp32, model, artifact, images, mode.opset)
            figures.update(
                _int8_figures(
                    int8_parity(
                        tmp,
                        images.heldout,
                        images.labels,
                        reference,
                        max_top1_drop=int8.max_top1_drop,
                        min_agreement=int8.min_agreement,
                    )
                )
            )
        elif check:
            figures.update(_float_figures(float_parity(tmp, model, artifact.spec).raise_for_failure()))
        set_metadata(proto, artifact, mode.storage, mode.precision, _check_metadata(mode.precision, figures))
        data = proto.SerializeToString()
        tmp.write_bytes(data)
    return ExportResult(
        path=out,
        format="onnx",
        file_bytes=len(data),
        masked_weights=artifact.masked_weights,
        kept_weights=artifact.kept_weights,
        bits_per_weight=bits_per_weight(len(data), artifact.masked_weights),
        seconds=time.perf_counter() - started,
        opset=mode.opset,
        storage=mode.storage,
        precision=mode.precision,
        **figures,
    )


def _build(artifact: Artifact, model: nn.Module, mode: ExportMode, images: CheckImages | None):
    """The finished ModelProto of `mode` and, for int8, what quantization did and the fp32 graph."""
    proto = trace_to_onnx(model, artifact.spec, mode.opset)
    quantized: QuantizeInfo | None = None
    fp32 = None
    if mode.precision == "int8":
        fp32 = proto
        proto = quantize(fp32, images.calibration, lossy=mode.lossy)
        quantized = check_int8_weights(proto, fp32, exact=not mode.lossy, calibration_images=len(images.calibration))
    if mode.storage == "compact":
        # lossy int8 rounds small weights to 0: its nonzero count is not the artifact's kept count
        compact_weights(
            proto, expect_total=artifact.masked_weights, expect_kept=None if mode.lossy else artifact.kept_weights
        )
    elif mode.storage == "regen":
        regen_weights(proto, artifact, mode.opset)
    set_metadata(proto, artifact, mode.storage, mode.precision)
    finalize(proto)
    return proto, quantized, fp32


def _reference(fp32, model: nn.Module, artifact: Artifact, images: CheckImages, opset: int) -> np.ndarray:
    """The fp32 network's logits for the held-out images (what int8 is compared with), from the fp32
    graph in onnxruntime (several times faster than PyTorch eager), itself checked against PyTorch; kept
    in `images` for the next export that shares them."""
    if opset not in images.reference_logits:
        fp32.ir_version = min(fp32.ir_version, MAX_IR_VERSION)
        data = fp32.SerializeToString()
        session = ort_session(data)
        float_parity(session, model, artifact.spec).raise_for_failure()
        images.reference_logits[opset] = run_session(session, images.heldout)
    return images.reference_logits[opset]


def _float_figures(parity: Parity) -> dict:
    return {"max_abs_diff": parity.max_abs_diff, "parity_tolerance": parity.tolerance}


def _int8_figures(check: Int8Check) -> dict:
    return {
        "max_abs_diff": check.output_max_abs_diff,
        "kernel_max_steps": check.kernels.max_steps,
        "top1": check.top1,
        "reference_top1": check.reference_top1,
        "argmax_agreement": check.argmax_agreement,
        "check_examples": check.examples,
    }


def _check_metadata(precision: str, figures: dict) -> dict[str, str]:
    """The export's own figures, recorded in the file (`maskforge.export_check`, `maskforge.calibration`)."""
    keys = (
        "max_abs_diff",
        "parity_tolerance",
        "kernel_max_steps",
        "int8_weight_max_error",
        "top1",
        "reference_top1",
        "argmax_agreement",
        "check_examples",
        "lossy",
    )
    entries = {"export_check": json.dumps({key: figures.get(key) for key in keys}, sort_keys=True)}
    if precision == "int8":
        entries["calibration"] = json.dumps(
            {
                "data": figures["calibration_data"],
                "images": figures["calibration_images"],
                "method": "MinMax",
                "activations": "uint8, asymmetric, per tensor",
                "weights": "int8, symmetric, per output channel"
                + ("" if figures["lossy"] else ": -1/0/+1 x c_j, exact"),
            },
            sort_keys=True,
        )
    return entries

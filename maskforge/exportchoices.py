"""The export choices as names and numbers, torch-free: `maskforge export` checks them before anything
heavy loads (a usage error answers in about half a second instead of after importing torch), and
`export.modes` builds its modes on them. One definition of each, here."""

from __future__ import annotations

from .errors import MaskforgeError

FORMATS = ("onnx", "torch")
STORAGES = ("dense", "compact", "regen")
PRECISIONS = ("fp32", "int8")
DEFAULT_OPSET = 18  # the lowest opset regen can use (bitwise operators)
MIN_OPSET = 13  # per-channel DequantizeLinear, Slice/Unsqueeze with inputs
MAX_OPSET = 20  # the TorchScript exporter's newest opset (export/trace.py)
DEFAULT_CALIBRATION = 256  # training images whose activation ranges set the int8 scales


def check_choices(storage: str | None, precision: str, opset: int | None) -> int:
    """Refuse an unknown storage or precision, or an opset out of range, in one line; the opset to use."""
    if storage is not None and storage not in STORAGES:
        raise MaskforgeError(f"storage must be one of {', '.join(STORAGES)}; got {storage!r}")
    if precision not in PRECISIONS:
        raise MaskforgeError(f"precision must be one of {', '.join(PRECISIONS)}; got {precision!r}")
    opset = DEFAULT_OPSET if opset is None else opset
    if isinstance(opset, bool) or not isinstance(opset, int) or not MIN_OPSET <= opset <= MAX_OPSET:
        raise MaskforgeError(f"opset must be an integer from {MIN_OPSET} to {MAX_OPSET}, got {opset!r}")
    return opset

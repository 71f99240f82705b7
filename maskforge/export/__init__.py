"""Export an artifact for deployment: ONNX (three storages x two precisions) or a PyTorch state dict.

One module per job:

* `modes`        the choices (storage dense|compact|regen, precision fp32|int8, opset), checked up front,
                 the file name of each mode, and `EXPORT_MODES` (all six, the rows of `eval --compare`)
* `trace`        materialized network -> ONNX graph (TorchScript exporter, batch norm folded)
* `int8`         QDQ quantization with onnxruntime's tooling; weights exactly -1/0/+1 x c_j
* `calibration`  the training / held-out images int8 calibrates and is checked on, and the check that
                 data fit a model (`matching_splits`, which `eval` uses too)
* `compact`      weights as packed mask + sign bits, rebuilt by standard operators at session start
* `regen_graph`  weights regenerated from the seed inside the graph (SplitMix64 in ONNX integer ops)
* `destination`  the output path: checked up front, missing folders made (and removed on failure)
* `metadata`     the `maskforge.*` metadata_props that tie a file to its artifact
* `sessions`     onnxruntime sessions: CPU, quiet, an optimization level, one error for a bad model
* `parity`       the output checks shared with `verify`
* `kernels`      the int8 kernel check: integer kernels against the graph run in float, kernel by kernel
* `onnx_export`  `export_onnx`: the steps above, then the check, then the atomic rename
* `torch_export` `export_torch` / `load_torch_export`

>>> result = export_onnx("runs/demo/artifact.safetensors")        # doctest: +SKIP
>>> result.storage, result.precision, result.bits_per_weight < 1.2  # doctest: +SKIP
('regen', 'fp32', True)
"""

from ..exportchoices import DEFAULT_CALIBRATION
from .calibration import matching_splits, searched_data
from .compact import compact_weights
from .metadata import META_PREFIX, OnnxModelInfo, artifact_identity, read_onnx_metadata
from .destination import check_output_path, output_folder
from .modes import (
    DEFAULT_OPSET,
    EXPORT_MODES,
    MAX_OPSET,
    MIN_OPSET,
    PRECISIONS,
    STORAGES,
    ExportMode,
    default_export_path,
    resolve_mode,
)
from .onnx_export import ExportResult, Int8Options, export_onnx
from .parity import PARITY_RTOL, compare_logits, float_parity
from .sessions import ort_message, ort_session
from .torch_export import TORCH_EXPORT_FORMAT, TORCH_EXPORT_KEY, export_torch, load_torch_export

__all__ = [
    "export_onnx",
    "Int8Options",
    "export_torch",
    "load_torch_export",
    "ExportResult",
    "ExportMode",
    "EXPORT_MODES",
    "resolve_mode",
    "default_export_path",
    "check_output_path",
    "output_folder",
    "STORAGES",
    "PRECISIONS",
    "DEFAULT_OPSET",
    "MIN_OPSET",
    "MAX_OPSET",
    "DEFAULT_CALIBRATION",
    "matching_splits",
    "searched_data",
    "META_PREFIX",
    "OnnxModelInfo",
    "read_onnx_metadata",
    "artifact_identity",
    "TORCH_EXPORT_KEY",
    "TORCH_EXPORT_FORMAT",
    "ort_session",
    "ort_message",
    "compare_logits",
    "float_parity",
    "PARITY_RTOL",
    "compact_weights",
]

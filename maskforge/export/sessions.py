"""onnxruntime sessions as maskforge opens and runs them: CPU, quiet, a chosen optimization level, and one
clear error for a model onnxruntime cannot load."""

from __future__ import annotations

import os
import re

import numpy as np

from ..errors import MaskforgeError, first_line


def ort_session(
    path: str | os.PathLike | bytes,
    threads: int | None = None,
    *,
    optimization: str = "default",
    optimized_path: str | os.PathLike | None = None,
):
    """An onnxruntime CPU session with default options, except the thread count when given.

    `path` is a file, or the serialized model itself (bytes).

    `optimization`: "default" (onnxruntime's: everything), "basic" (constant folding and other
    semantics-preserving rewrites only: weight subgraphs become initializers, Q/DQ stay), "none" (QDQ
    nodes then run one by one, in float). `optimized_path` saves the graph onnxruntime actually runs.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    # fatal only: at 3 (errors) a kernel that fails while running prints its own "[E:onnxruntime ...]" line
    # on stderr before the one-line error maskforge raises for it (`ort_message` quotes it there)
    options.log_severity_level = 4
    if threads:
        options.intra_op_num_threads = int(threads)
        options.inter_op_num_threads = 1
    levels = {
        "default": None,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    }
    if levels[optimization] is not None:
        options.graph_optimization_level = levels[optimization]
    if optimized_path is not None:
        options.optimized_model_filepath = str(optimized_path)
    model = path if isinstance(path, bytes) else str(path)
    try:
        return ort.InferenceSession(model, sess_options=options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
        what = "the model" if isinstance(path, bytes) else path
        raise MaskforgeError(f"onnxruntime cannot load {what}: {ort_message(exc)}") from None


def ort_message(exc: BaseException, limit: int = 300) -> str:
    """onnxruntime's exception text for a one-line error: its first line without the "[ONNXRuntimeError] :
    1 : FAIL :" prefix, at most `limit` characters."""
    return re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ", "", first_line(exc))[:limit]


def run_session(session, x: np.ndarray, batch: int = 256) -> np.ndarray:
    """The session's first output for `x`, run `batch` images at a time."""
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: x[i : i + batch]})[0] for i in range(0, len(x), batch)])

"""Builders shared by the eval, compare, predict and verify tests (pytest puts this folder on sys.path)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from maskforge.export import export_onnx
from maskforge.searches import SearchConfig, search


def searched_fc(out: Path, steps: int = 10) -> Path:
    """A short real search of the MLP on the demo data (about a second) into `out`, with its compact
    (`model.onnx`) and dense (`model.dense.onnx`) ONNX exports beside `artifact.safetensors`."""
    result = search(SearchConfig(arch="fc", k=0.5, epochs=1, max_steps=steps, batch_size=128, out=str(out)))
    export_onnx(result.artifact_path, out / "model.onnx", storage="compact")
    export_onnx(result.artifact_path, out / "model.dense.onnx", storage="dense")
    return out


def edited_to_fail_while_running(source: Path, dest: Path) -> Path:
    """A copy of a dense maskforge export (metadata intact) that onnxruntime loads but cannot run: a Slice
    cuts the last image row off before the Flatten, so the MatMul after it gets too few inputs; the input's
    sides are left open so that onnxruntime cannot see the mismatch when the session is created."""
    proto = onnx.load(str(source))
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    height = dims[2].dim_value
    dims[2].dim_param, dims[3].dim_param = "height", "width"
    del proto.graph.value_info[:]
    flatten = next(node for node in proto.graph.node if node.op_type == "Flatten")
    cut = helper.make_node("Slice", [flatten.input[0], "cut/start", "cut/end", "cut/axis"], ["cut"])
    flatten.input[0] = "cut"
    proto.graph.node.insert(0, cut)
    proto.graph.initializer.extend(
        numpy_helper.from_array(np.array([v], dtype=np.int64), f"cut/{name}")
        for name, v in (("start", 0), ("end", height - 1), ("axis", 2))
    )
    onnx.save(proto, str(dest))
    return dest

"""Why maskforge's int8 weights are -1/0/+1 and never +-127: the one-node QLinearConv regression case.

onnxruntime's u8 x s8 kernels on x86 CPUs with AVX2 but without VNNI multiply with `vpmaddubsw`, which
adds each *pair* of u8 x s8 products into a saturating int16 before the int32 accumulation. A pair of
255 x 127 products is 64,770: it clips at 32,767. Stock `quantize_static` stores weights as +-127 (scale
max|w| / 127), so such CPUs compute wrong sums; with -1/0/+1 a pair is at most 510 and cannot clip.

The case: 2 input channels at 255 (scale 1, zero point 0), a 1x1 convolution with weights w, output
scale chosen so that the exact result is 200. With w = 127 the saturated accumulator 32,767 gives 101.
CPUs with VNNI (`avx512_vnni`, `avx_vnni`: `vpdpbusd` accumulates in int32) and non-x86 CPUs compute
200; there the test checks that, and `test_int16_pair_model` shows, with an integer model of
`vpmaddubsw`, what an AVX2 CPU without VNNI computes.
"""

from __future__ import annotations

import platform
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

CHANNELS = 2
PIXEL = 255
EXACT = 200


def cpu_flags() -> set[str]:
    """The CPU feature flags (what `lscpu` lists), from /proc/cpuinfo; empty where unavailable."""
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.exists():
        return set()
    for line in cpuinfo.read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def saturating_cpu() -> bool:
    """True where onnxruntime's u8 x s8 kernels use int16 pair sums: x86 with AVX2 and no VNNI."""
    flags = cpu_flags()
    x86 = platform.machine().lower() in ("x86_64", "amd64", "i686")
    return x86 and "avx2" in flags and not ({"avx512_vnni", "avx_vnni"} & flags)


def one_node_qlinearconv(weight: int) -> tuple[bytes, float, int]:
    """A QLinearConv over CHANNELS inputs at PIXEL with every weight `weight`, its output scale set so
    that |exact result| is EXACT steps; negative weights get the zero point 255, so the exact output
    is 255 - EXACT. Returns (model bytes, output scale, output zero point)."""
    accumulator = CHANNELS * PIXEL * weight
    y_scale, y_zero = np.float32(abs(accumulator) / EXACT), (0 if weight > 0 else 255)
    tensors = [
        numpy_helper.from_array(np.array(1.0, np.float32), "x_scale"),
        numpy_helper.from_array(np.array(0, np.uint8), "x_zero"),
        numpy_helper.from_array(np.full((1, CHANNELS, 1, 1), weight, np.int8), "w"),
        numpy_helper.from_array(np.array([1.0], np.float32), "w_scale"),
        numpy_helper.from_array(np.array([0], np.int8), "w_zero"),
        numpy_helper.from_array(np.array(y_scale, np.float32), "y_scale"),
        numpy_helper.from_array(np.array(y_zero, np.uint8), "y_zero"),
    ]
    node = helper.make_node(
        "QLinearConv", ["x", "x_scale", "x_zero", "w", "w_scale", "w_zero", "y_scale", "y_zero"], ["y"]
    )
    graph = helper.make_graph(
        [node],
        "one_qlinearconv",
        [helper.make_tensor_value_info("x", TensorProto.UINT8, [1, CHANNELS, 1, 1])],
        [helper.make_tensor_value_info("y", TensorProto.UINT8, [1, 1, 1, 1])],
        tensors,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString(), float(y_scale), y_zero


def run_onnxruntime(weight: int) -> int:
    data, _, _ = one_node_qlinearconv(weight)
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    x = np.full((1, CHANNELS, 1, 1), PIXEL, np.uint8)
    return int(session.run(None, {"x": x})[0].ravel()[0])


def pair_sum_model(x: np.ndarray, w: np.ndarray) -> int:
    """u8 x s8 dot product the way vpmaddubsw + vpmaddwd compute it: int16-saturated pairs, int32 sum."""
    products = x.astype(np.int32) * w.astype(np.int32)
    pairs = products.reshape(-1, 2).sum(axis=1)
    return int(np.clip(pairs, -32768, 32767).sum())


def requantize(accumulator: int, y_scale: float) -> int:
    return int(np.clip(np.rint(np.float32(accumulator) / np.float32(y_scale)), 0, 255))


def test_int16_pair_model():
    """The integer model: +-127 weights clip (200 -> 101), -1/0/+1 weights cannot (a pair is <= 510)."""
    x = np.full(CHANNELS, PIXEL, np.uint8)
    _, scale_127, _ = one_node_qlinearconv(127)
    assert requantize(int((x.astype(np.int32) * 127).sum()), scale_127) == EXACT
    assert requantize(pair_sum_model(x, np.full(CHANNELS, 127, np.int8)), scale_127) == 101
    # every u8 pair with every -1/0/+1 weight pair: the model equals the exact sum
    values = np.arange(256)
    pairs = np.stack(np.meshgrid(values, values), -1).reshape(-1, 2).astype(np.uint8)
    for w in ([1, 1], [-1, -1], [1, -1], [0, 1]):
        weights = np.tile(np.array(w, np.int8), len(pairs))
        exact = int((pairs.astype(np.int64).reshape(-1) * weights).sum())
        assert pair_sum_model(pairs.reshape(-1), weights) == exact


def test_qlinearconv_with_127_weights():
    got = run_onnxruntime(127)
    if saturating_cpu():
        # This CPU has AVX2 and no VNNI: onnxruntime's int16 pair sums clip, as the model predicts.
        assert got == 101, f"expected the saturated 101 on this AVX2-without-VNNI CPU, got {got}"
    else:
        # This CPU accumulates u8 x s8 in int32 (VNNI, or not x86): no saturation to show here; the
        # exact result is checked, and test_int16_pair_model shows what AVX2 without VNNI computes.
        assert got == EXACT, f"expected the exact {EXACT} on a CPU without int16 pair sums, got {got}"


@pytest.mark.parametrize("weight", [1, -1])
def test_qlinearconv_with_unit_weights_is_exact_on_every_cpu(weight):
    """The form maskforge writes: |w| = 1 (c_j goes into the scale): exact on every kernel."""
    assert run_onnxruntime(weight) == (EXACT if weight > 0 else 255 - EXACT)

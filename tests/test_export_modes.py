"""The six export modes (storage dense|compact|regen x precision fp32|int8): exactness, sizes, the graph
onnxruntime actually runs, the metadata, `verify`, and bad input.

Oracles: the dense fp32 export (traced from the materialized network) and `materialize` itself for the
weights; an independent dequantization of the int8 tensors (q x scale, written here from the ONNX
DequantizeLinear definition); the artifact's file size; onnxruntime's own optimized graph.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper
from typer.testing import CliRunner

from helpers import perturb_like_search, write_image_folder
from maskforge import regen
from maskforge.archs import arch_args, create_model
from maskforge.artifact import build_artifact, load_artifact, save_artifact
from maskforge.cli import app
from maskforge.data import load_data
from maskforge.errors import MaskforgeError
from maskforge.export import Int8Options, default_export_path, export_onnx, read_onnx_metadata
from maskforge.materialization import materialize
from maskforge.verify import verify_onnx

MODES = [(storage, precision) for precision in ("fp32", "int8") for storage in ("dense", "compact", "regen")]
FAST_INT8 = Int8Options(calibration=32, check_images=200)  # the checks' data: enough to run, quick


def demo_artifact(
    folder: Path, arch: str, *, k: float = 0.5, init: str = "signed_constant", seed: int = 0, name: str | None = None
) -> Path:
    """An artifact of the demo data's shape, spec and provenance (so int8 can calibrate on mnist5k)."""
    spec = load_data("mnist5k").spec
    model = create_model(arch, in_channels=1, num_classes=10, image_size=(28, 28), k=k, seed=seed, init=init)
    perturb_like_search(model, seed + 7, score_noise=0.05, bn_mean_scale=0.2, bn_var_floor=0.5)
    artifact = build_artifact(
        model.eval(),
        arch=arch,
        arch_args=arch_args(1, 10, (28, 28)),
        spec=spec,
        seed=seed,
        init=init,
        scale_fan=False,
        k=k,
        provenance={"data": "mnist5k", "heldout_acc": None},
    )
    return save_artifact(artifact, folder / (name or f"{arch}-{init}.safetensors"))


def small_artifact(folder: Path, arch: str, channels: int, size: int) -> Path:
    """A tiny artifact of any shape (fp32 modes need no data)."""
    from test_export import make_artifact

    return make_artifact(folder, arch, channels, size)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("modes")


@pytest.fixture(scope="module")
def conv2(folder) -> SimpleNamespace:
    """conv2 on the demo shape (no batch norm: its weights are materialize's), exported in all six modes."""
    path = demo_artifact(folder, "conv2")
    artifact = load_artifact(path)
    model = materialize(artifact)
    results = {
        mode: export_onnx(
            artifact,
            folder / f"conv2.{mode[0]}.{mode[1]}.onnx",
            storage=mode[0],
            precision=mode[1],
            model=model,
            int8=FAST_INT8,
        )
        for mode in MODES
    }
    return SimpleNamespace(path=path, artifact=artifact, model=model, results=results)


def folded_initializers(path: Path, tmp_path: Path) -> dict[str, np.ndarray]:
    """The initializers of the graph onnxruntime runs after constant folding (Q/DQ nodes kept)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(tmp_path / f"{path.stem}.folded.onnx")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    proto = onnx.load(options.optimized_model_filepath)
    return {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}


def optimized_op_types(path: Path, tmp_path: Path) -> set[str]:
    options = ort.SessionOptions()  # default level: what a user's session runs
    options.optimized_model_filepath = str(tmp_path / f"{path.stem}.optimized.onnx")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return {node.op_type for node in onnx.load(options.optimized_model_filepath).graph.node}


def dequantize(proto: onnx.ModelProto, initializers: dict[str, np.ndarray]) -> dict[str, tuple]:
    """{float weight name: (int8 values, q * scale)} for every DequantizeLinear with constant inputs."""
    out = {}
    for node in proto.graph.node:
        if node.op_type != "DequantizeLinear" or node.input[0] not in initializers:
            continue
        q = initializers[node.input[0]]
        scale = initializers[node.input[1]]
        if q.dtype != np.int8 or q.ndim < 2:
            continue
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        shape = [1] * q.ndim
        shape[axis] = -1
        out[node.output[0]] = (q, q.astype(np.float32) * scale.reshape(shape if scale.ndim else []))
    return out


def run(path: Path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"input": x})[0]


# ---------------------------------------------------------------------------------------------------------
# all six modes
# ---------------------------------------------------------------------------------------------------------


def test_all_six_modes_are_written_checked_and_labelled(conv2):
    x = torch.randn(5, 1, 28, 28, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        reference = conv2.model(x).numpy()
    for (storage, precision), result in conv2.results.items():
        assert (result.storage, result.precision) == (storage, precision)
        assert result.file_bytes == result.path.stat().st_size
        proto = onnx.load(str(result.path))
        onnx.checker.check_model(proto)
        assert proto.ir_version <= 10
        info = read_onnx_metadata(proto)
        assert (info.storage, info.precision) == (storage, precision)
        got = run(result.path, x.numpy())
        if precision == "fp32":
            assert np.abs(got - reference).max() <= 1e-4 * max(1.0, np.abs(reference).max())
        else:
            calibration = json.loads(info.metadata["maskforge.calibration"])
            assert calibration["data"] == "mnist5k" and calibration["images"] == 32
            assert result.int8_weight_max_error == 0.0 and result.check_examples == 200
    sizes = {mode: result.file_bytes for mode, result in conv2.results.items()}
    for precision in ("fp32", "int8"):
        assert sizes[("regen", precision)] < sizes[("compact", precision)] < sizes[("dense", precision)]


def test_default_mode_is_regen_fp32_and_names_are_distinct(folder, conv2):
    names = {default_export_path(conv2.path, storage=s, precision=p).name for s, p in MODES}
    assert len(names) == 6
    assert default_export_path(conv2.path).name == "conv2-signed_constant.onnx"
    assert (
        default_export_path(conv2.path, storage="compact", precision="int8").name
        == "conv2-signed_constant.compact.int8.onnx"
    )
    result = export_onnx(conv2.artifact, folder / "default.onnx", model=conv2.model)
    assert (result.storage, result.precision, result.opset) == ("regen", "fp32", 18)


# ---------------------------------------------------------------------------------------------------------
# regen: the weights, the logits, the size
# ---------------------------------------------------------------------------------------------------------


def test_regen_folds_to_materializes_weights_bit_for_bit(conv2, tmp_path):
    """conv2 has no batch norm, so the traced weights are materialize's own tensors."""
    folded = folded_initializers(conv2.results[("regen", "fp32")].path, tmp_path)
    dense = onnx.load(str(conv2.results[("dense", "fp32")].path))
    state = {name: tensor.numpy() for name, tensor in conv2.model.state_dict().items()}
    matched = 0
    for tensor in dense.graph.initializer:
        weight = numpy_helper.to_array(tensor)
        if weight.ndim < 2:
            continue
        assert folded[tensor.name].tobytes() == weight.tobytes(), tensor.name  # bit for bit, +0.0 included
        as_param = weight.T if weight.ndim == 2 else weight  # MatMul stores [in, out]
        assert any(as_param.tobytes() == s.tobytes() for s in state.values() if s.shape == as_param.shape)
        matched += 1
    assert matched == len(conv2.artifact.masks)
    # the file stores no float weight: only packed masks, keys, shapes and magnitudes
    stored = onnx.load(str(conv2.results[("regen", "fp32")].path))
    assert not any(t.data_type == onnx.TensorProto.FLOAT and len(t.dims) >= 2 for t in stored.graph.initializer)


def test_regen_stores_the_artifacts_mask_bytes_and_stream_keys(conv2):
    proto = onnx.load(str(conv2.results[("regen", "fp32")].path))
    tensors = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    keys = sorted(int(v) for name, v in tensors.items() if name.endswith("/maskforge/key"))
    expected = sorted(regen.stream_key(conv2.artifact.seed, param) for param in conv2.artifact.masks)
    assert keys == expected
    masks = sorted(v.tobytes() for name, v in tensors.items() if name.endswith("/maskforge/mask_packed"))
    artifact_masks = sorted(
        np.packbits(m.numpy().reshape(-1), bitorder="little").tobytes() for m in conv2.artifact.masks.values()
    )
    assert masks == artifact_masks
    assert [f.name for f in proto.functions] == ["signed_weight"]


def test_regen_file_size_against_the_artifact(folder):
    """Regen fp32 is at most 1.10 x the artifact (conv4 at k 0.5: 1.9 M weights, the demo's size)."""
    artifact = load_artifact(small_artifact(folder, "conv4", 1, 28))
    result = export_onnx(artifact, folder / "conv4-size.onnx", storage="regen")
    assert result.file_bytes <= 1.10 * artifact.file_bytes, (result.file_bytes, artifact.file_bytes)
    assert result.bits_per_weight == pytest.approx(8 * result.file_bytes / artifact.masked_weights)


def test_unsigned_constant_regen_needs_no_stream(folder):
    artifact = load_artifact(demo_artifact(folder, "fc", init="unsigned_constant"))
    result = export_onnx(artifact, folder / "fc-unsigned.onnx", storage="regen")
    proto = onnx.load(str(result.path))
    assert [f.name for f in proto.functions] == ["masked_weight"]
    assert not any(t.name.endswith("/key") for t in proto.graph.initializer)


# ---------------------------------------------------------------------------------------------------------
# int8: exact weights, fused kernels
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("storage", ["dense", "regen"])
def test_int8_weights_are_exact(conv2, storage, tmp_path):
    """max |dequantized int8 weight - folded float weight| = 0, and every int8 weight is -1, 0 or +1."""
    path = conv2.results[(storage, "int8")].path
    initializers = folded_initializers(path, tmp_path)
    weights = dequantize(onnx.load(str(tmp_path / f"{path.stem}.folded.onnx")), initializers)
    dense = {
        t.name: numpy_helper.to_array(t)
        for t in onnx.load(str(conv2.results[("dense", "fp32")].path)).graph.initializer
        if len(t.dims) >= 2
    }
    assert len(weights) == len(dense) == len(conv2.artifact.masks)
    for fp32_name, fp32 in dense.items():
        match = [(q, w) for q, w in weights.values() if w.shape == fp32.shape and np.array_equal(w != 0, fp32 != 0)]
        assert len(match) == 1, fp32_name
        q, w = match[0]
        assert set(np.unique(q)) <= {-1, 0, 1}
        assert float(np.abs(w.astype(np.float64) - fp32).max()) == 0.0


@pytest.mark.parametrize("storage", ["dense", "regen"])
def test_onnxruntime_runs_int8_as_qlinear_kernels(conv2, storage, tmp_path):
    ops = optimized_op_types(conv2.results[(storage, "int8")].path, tmp_path)
    assert "QLinearConv" in ops and "QLinearMatMul" in ops, ops
    assert not ops & {"Conv", "MatMul", "Gemm", "FusedConv", "BitShift", "BitwiseXor", "Where"}, ops


def test_regen_int8_size(conv2):
    assert conv2.results[("regen", "int8")].bits_per_weight <= 1.15


# ---------------------------------------------------------------------------------------------------------
# bug: a fixed absolute parity bound refused valid networks with large logits
# ---------------------------------------------------------------------------------------------------------


def test_large_logits_export_with_a_relative_tolerance(folder):
    """A conv2 unsigned-constant network has logits in the tens of thousands: one float32 step there is
    ~1e-3, so onnxruntime and PyTorch differ by more than the old absolute bound of 1e-4."""
    artifact = load_artifact(demo_artifact(folder, "conv2", init="unsigned_constant", name="conv2-big.safetensors"))
    model = materialize(artifact)
    result = export_onnx(artifact, folder / "conv2-big.onnx", storage="dense", model=model)
    x = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(20200601))
    with torch.no_grad():
        reference = model(x).numpy()
    assert np.abs(reference).max() > 1000
    diff = np.abs(run(result.path, x.numpy()) - reference).max()
    assert diff > 1e-4  # what the old check refused
    assert diff <= result.parity_tolerance == pytest.approx(1e-4 * np.abs(reference).max(), rel=1e-3)


# ---------------------------------------------------------------------------------------------------------
# verify and the metadata of older files
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", [("regen", "fp32"), ("regen", "int8"), ("compact", "int8")])
def test_verify_accepts_every_mode(conv2, mode):
    report = verify_onnx(conv2.results[mode].path, conv2.path)
    assert report.ok, report.failure
    assert f"({mode[0]} storage, {mode[1]})" in report.checks[-2].detail


def test_verify_catches_an_int8_weight_that_is_not_the_artifacts(conv2, tmp_path):
    proto = onnx.load(str(conv2.results[("dense", "int8")].path))
    for index, tensor in enumerate(proto.graph.initializer):
        array = numpy_helper.to_array(tensor)
        if array.dtype == np.int8 and array.ndim == 4:
            array = array.copy()
            array.flat[int(np.flatnonzero(array)[0])] *= -1  # one sign flipped
            proto.graph.initializer[index].CopyFrom(numpy_helper.from_array(array, tensor.name))
            break
    edited = tmp_path / "flipped.int8.onnx"
    edited.write_bytes(proto.SerializeToString())
    report = verify_onnx(edited, conv2.path)
    assert report.failure.name == "onnx outputs"
    assert "does not dequantize to any weight of the artifact's network exactly" in report.failure.detail


def test_files_without_a_precision_read_as_fp32(conv2):
    old = {
        "maskforge.preprocessing": json.dumps({"channels": 1, "height": 28, "width": 28, "mean": [0.1], "std": [0.3]}),
        "maskforge.class_names": json.dumps(list("0123456789")),
        "maskforge.storage": "compact",
    }
    info = read_onnx_metadata(old)
    assert (info.storage, info.precision) == ("compact", "fp32")


# ---------------------------------------------------------------------------------------------------------
# bad input: one clear error, nothing left behind
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def kaiming(folder) -> Path:
    return demo_artifact(folder, "fc", init="kaiming_normal")


@pytest.fixture(scope="module")
def rgb_folder(tmp_path_factory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("rgb"), train_per_class=4, val_per_class=2)


@pytest.fixture(scope="module")
def odd_shapes(tmp_path_factory) -> dict[str, Path]:
    """Artifacts the demo data does not fit: 8x8 images ("small"), 3 classes ("three")."""
    from test_export import make_artifact

    folder = tmp_path_factory.mktemp("odd")
    return {"small": make_artifact(folder, "fc", 1, 8), "three": make_artifact(folder, "fc", 1, 28, classes=3)}


BAD = [
    (
        "regen below opset 18",
        "good",
        ["--storage", "regen", "--opset", "17"],
        "storage 'regen' needs opset 18 or later (BitwiseXor, BitwiseAnd), got opset 17; use opset 18 to 20, or storage "
        "'compact', which works from opset 13",
    ),
    (
        "regen of kaiming_normal",
        "kaiming",
        ["--storage", "regen"],
        "storage 'regen' cannot rebuild kaiming_normal weights exactly",
    ),
    (
        "int8 of kaiming_normal",
        "kaiming",
        ["--precision", "int8"],
        "precision 'int8' of kaiming_normal weights is lossy",
    ),
    (
        "calibration 0",
        "good",
        ["--precision", "int8", "--calibration", "0"],
        "calibration must be a positive number of images, got 0",
    ),
    (
        "calibration data of other channels",
        "good",
        ["--precision", "int8", "--data", "RGB"],
        "has 3-channel images, the model takes 1",
    ),
    (
        "calibration data of another size",
        "small",
        ["--precision", "int8", "--data", "mnist5k"],
        "calibration data mnist5k has 28x28 images, the model takes 8x8",
    ),
    (
        "calibration data of other classes",
        "three",
        ["--precision", "int8", "--data", "mnist5k"],
        "calibration data mnist5k has 10 classes, the model predicts 3",
    ),
    (
        "calibration data not on this machine",
        "small",
        ["--precision", "int8"],
        "the model was searched on test, which is not on this machine; give --data",
    ),
    ("unknown storage", "good", ["--storage", "sparse"], "storage must be one of dense, compact, regen; got 'sparse'"),
    ("unknown precision", "good", ["--precision", "int4"], "precision must be one of fp32, int8; got 'int4'"),
    ("torch with a storage", "good", ["--format", "torch", "--storage", "regen"], "apply to --format onnx only"),
]


@pytest.mark.parametrize("case,which,argv,message", BAD, ids=[case[0] for case in BAD])
def test_bad_input_is_one_error_line_exit_2_and_no_file(
    conv2, kaiming, rgb_folder, odd_shapes, tmp_path, case, which, argv, message
):
    artifact = {"good": conv2.path, "kaiming": kaiming, **odd_shapes}[which]
    argv = [str(rgb_folder) if arg == "RGB" else arg for arg in argv]
    out = tmp_path / "out" / "m.onnx"
    out.parent.mkdir()
    result = CliRunner().invoke(app, ["export", str(artifact), "--out", str(out), *argv])
    assert result.exit_code == 2, (result.stdout, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
    assert list(out.parent.iterdir()) == []


def test_unwritable_destination_is_refused_before_calibrating(conv2, tmp_path, monkeypatch):
    """Simulated (the tests may run as root, who can write anywhere): the folder is reported not
    writable, and nothing is loaded, calibrated or written."""
    import maskforge.export.onnx_export as onnx_export

    def no_work(*args, **kwargs):
        raise AssertionError("calibration data loaded before the destination was checked")

    real_access = os.access

    def access(path, mode, *args, **kwargs):
        return False if Path(path) == tmp_path and mode & os.W_OK else real_access(path, mode, *args, **kwargs)

    monkeypatch.setattr(onnx_export, "load_check_images", no_work)
    monkeypatch.setattr(os, "access", access)
    result = CliRunner().invoke(
        app, ["export", str(conv2.path), "--precision", "int8", "--out", str(tmp_path / "m.onnx")]
    )
    assert result.exit_code == 2
    assert result.stderr.splitlines() == [
        f"error: cannot write {tmp_path / 'm.onnx'}: output folder {tmp_path} is not writable"
    ]
    assert list(tmp_path.iterdir()) == []


def test_lossy_int8_needs_the_opt_in_and_warns(kaiming, tmp_path):
    with pytest.warns(UserWarning, match="int8 of kaiming_normal weights is lossy"):
        result = export_onnx(kaiming, tmp_path / "lossy.onnx", precision="int8", allow_lossy=True, int8=FAST_INT8)
    assert result.lossy and result.int8_weight_max_error > 0
    assert result.top1 is not None and result.argmax_agreement >= 0.95
    proto = onnx.load(str(result.path))
    assert json.loads(read_onnx_metadata(proto).metadata["maskforge.export_check"])["lossy"] is True


def test_failed_int8_accuracy_check_leaves_no_file(conv2, tmp_path):
    with pytest.raises(MaskforgeError, match="int8 predicts the fp32 network's class for only"):
        export_onnx(
            conv2.artifact,
            tmp_path / "strict.onnx",
            precision="int8",
            model=conv2.model,
            int8=dataclasses.replace(FAST_INT8, min_agreement=1.01),
        )
    assert list(tmp_path.iterdir()) == []


def test_cli_int8_prints_its_checks(tmp_path):
    path = demo_artifact(tmp_path, "fc")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = CliRunner().invoke(
            app,
            [
                "export",
                str(path),
                "--precision",
                "int8",
                "--calibration",
                "16",
                "--out",
                str(tmp_path / "c.int8.onnx"),
                "--json",
            ],
        )
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert (report["storage"], report["precision"], report["calibration_images"]) == ("regen", "int8", 16)
    assert report["int8_weight_max_error"] == 0.0 and report["check_examples"] == 1000

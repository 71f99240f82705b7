"""Tests for materialize and export: the plain network against the masked search-time model, every
architecture family through ONNX (dense and compact) against PyTorch in onnxruntime, regen against dense,
the compact encoding against an independent decoder written from docs/DEPLOY.md, the size bound,
metadata, and the files left behind (none) when something fails. The int8 modes and the storage x
precision choices are tested in test_export_modes.py."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn
from onnx import numpy_helper
from typer.testing import CliRunner

from helpers import perturb_like_search
from maskforge import regen
from maskforge.archs import arch_args, create_model
from maskforge.artifact import build_artifact, load_artifact, save_artifact
from maskforge.cli import app
from maskforge.data import InputSpec, load_data, normalize
from maskforge.errors import MaskforgeError
from maskforge.export import default_export_path, export_onnx, export_torch, load_torch_export, read_onnx_metadata
from maskforge.layers import MASKED_TYPES
from maskforge.materialization import materialize

# ---------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------


def make_artifact(
    folder: Path,
    arch: str,
    channels: int,
    size: int,
    classes: int = 10,
    *,
    k: float = 0.5,
    seed: int = 0,
    init: str = "signed_constant",
    name: str | None = None,
) -> Path:
    """A saved artifact that looks searched: scores moved off their start, BN statistics set."""
    model = create_model(
        arch, in_channels=channels, num_classes=classes, image_size=(size, size), k=k, seed=seed, init=init
    )
    perturb_like_search(model, seed + 7, score_noise=0.05, bn_mean_scale=0.2, bn_var_floor=0.5)
    spec = InputSpec(
        channels,
        size,
        size,
        tuple(0.4 + 0.05 * c for c in range(channels)),
        tuple(0.2 + 0.01 * c for c in range(channels)),
        tuple(f"c{i}" for i in range(classes)),
    )
    artifact = build_artifact(
        model.eval(),
        arch=arch,
        arch_args=arch_args(channels, classes, (size, size)),
        spec=spec,
        seed=seed,
        init=init,
        scale_fan=False,
        k=k,
        provenance={"data": "test", "heldout_acc": None},
    )
    return save_artifact(artifact, folder / (name or f"{arch}-{channels}x{size}-{init}.safetensors"))


def inputs(spec_or_artifact, batch: int, seed: int = 1) -> torch.Tensor:
    spec = spec_or_artifact.spec if hasattr(spec_or_artifact, "spec") else spec_or_artifact
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, spec.channels, spec.height, spec.width, generator=gen)


def run_ort(path: Path, x: torch.Tensor) -> np.ndarray:
    session = ort.InferenceSession(str(path))  # default options: what a user would do
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


def decode_compact(proto: onnx.ModelProto) -> dict[str, np.ndarray]:
    """An independent decoder of the compact encoding, written from docs/DEPLOY.md (not from export.py)."""
    tensors = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    weights = {}
    for key in tensors:
        if not key.endswith("/maskforge/mask_packed"):
            continue
        name = key[: -len("/maskforge/mask_packed")]
        prefix = f"{name}/maskforge/"
        shape = tuple(int(d) for d in tensors[prefix + "shape"])
        count = math.prod(shape)
        mask = np.unpackbits(tensors[prefix + "mask_packed"].reshape(-1), bitorder="little")[:count].astype(bool)
        flat = np.zeros(count, dtype=np.float32)
        if prefix + "values" in tensors:
            flat[mask] = tensors[prefix + "values"]
        else:
            magnitude = np.broadcast_to(tensors[prefix + "magnitude"], shape).reshape(-1)[mask]
            if prefix + "sign_packed" in tensors:
                positive = np.unpackbits(tensors[prefix + "sign_packed"].reshape(-1), bitorder="little")[
                    : mask.sum()
                ].astype(bool)
                flat[mask] = np.where(positive, magnitude, -magnitude)
            else:
                flat[mask] = magnitude
        weights[name] = flat.reshape(shape)
    return weights


# tiny shapes of every architecture family: (arch, channels, size)
FAMILIES = [
    ("fc", 1, 8),
    ("conv2", 1, 8),
    ("conv4", 1, 8),
    ("conv6", 3, 8),
    ("conv8", 1, 16),
    ("resnet18", 3, 8),
    pytest.param("resnet34", 3, 8, marks=pytest.mark.slow),
    pytest.param("resnet50", 3, 16, marks=pytest.mark.slow),
    pytest.param("wrn50", 3, 16, marks=pytest.mark.slow),
    pytest.param("resnet18", 3, 72, marks=pytest.mark.slow, id="resnet18-imagenet-stem"),
]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("export")


@pytest.fixture(scope="module")
def exported(folder):
    """(arch, channels, size, init) -> artifact, materialized model and both ONNX exports, made once."""
    cache: dict = {}

    def get(arch: str, channels: int, size: int, init: str = "signed_constant") -> SimpleNamespace:
        key = (arch, channels, size, init)
        if key not in cache:
            artifact = load_artifact(make_artifact(folder, arch, channels, size, init=init))
            model = materialize(artifact)
            stem = folder / f"{arch}-{channels}x{size}-{init}"
            compact = export_onnx(artifact, stem.with_suffix(".onnx"), storage="compact", model=model)
            dense = export_onnx(artifact, stem.with_suffix(".dense.onnx"), storage="dense", model=model)
            cache[key] = SimpleNamespace(artifact=artifact, model=model, compact=compact, dense=dense)
        return cache[key]

    return get


# ---------------------------------------------------------------------------------------------------------
# materialize
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch,channels,size", [("fc", 1, 28), ("conv2", 1, 28), ("resnet18", 3, 8)])
def test_materialize_equals_the_masked_search_model(exported, arch, channels, size):
    entry = exported(arch, channels, size)
    artifact, plain = entry.artifact, entry.model
    masked = artifact.create_model()
    if channels == 1 and size == 28:  # a real held-out batch of the demo data
        splits = load_data("mnist5k")
        x = normalize(splits.heldout.images[:64], artifact.spec)
    else:
        x = inputs(artifact, 16)
    with torch.no_grad():
        diff = (masked(x) - plain(x)).abs().max().item()
    assert diff <= 1e-5


def test_materialize_is_a_plain_network(exported):
    entry = exported("resnet18", 3, 8)
    plain, artifact = entry.model, entry.artifact
    assert not plain.training
    assert not any(isinstance(m, MASKED_TYPES) for m in plain.modules())
    convs = [m for m in plain.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert convs and all(type(m) in (nn.Conv2d, nn.Linear) and m.bias is None for m in convs)
    assert all(not p.requires_grad for p in plain.parameters())
    assert not any("scores" in name for name, _ in plain.named_parameters())
    # the dropped weights are exactly zero, the kept ones the regenerated values
    name = next(iter(artifact.masks))
    weight = dict(plain.named_parameters())[name].numpy()
    mask = artifact.masks[name].numpy()
    expected = regen.generate(artifact.seed, name, mask.shape, artifact.init, k=artifact.k)
    assert np.array_equal(weight[mask], expected[mask]) and not weight[~mask].any()


def test_materialize_refuses_weights_that_fail_the_digest(folder, monkeypatch):
    path = make_artifact(folder, "conv2", 1, 8)
    real = regen.generate

    def drifted(seed, name, shape, *args, **kwargs):
        weights = real(seed, name, shape, *args, **kwargs)
        if name == "classifier.3.weight":
            weights = np.nextafter(weights, np.float32(np.inf))  # one ulp: what a different generator gives
        return weights

    monkeypatch.setattr(regen, "generate", drifted)
    with pytest.raises(MaskforgeError, match=r"layer classifier\.3\.weight do not match"):
        materialize(path)


# ---------------------------------------------------------------------------------------------------------
# ONNX round trips
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch,channels,size", FAMILIES)
def test_onnx_round_trip_dense_and_compact(exported, arch, channels, size):
    entry = exported(arch, channels, size)
    artifact, model, compact, dense = entry.artifact, entry.model, entry.compact, entry.dense
    for batch in (1, 5):  # the batch axis is dynamic
        x = inputs(artifact, batch, seed=batch)
        with torch.no_grad():
            reference = model(x).numpy()
        got_compact, got_dense = run_ort(compact.path, x), run_ort(dense.path, x)
        assert got_compact.shape == (batch, 10)
        assert np.abs(got_dense - reference).max() <= 1e-4
        assert np.abs(got_compact - reference).max() <= 1e-4
        assert np.array_equal(got_dense.argmax(1), reference.argmax(1))
        assert np.abs(got_compact - got_dense).max() <= 1e-6
    for result in (compact, dense):
        proto = onnx.load(str(result.path))
        onnx.checker.check_model(proto)
        assert proto.ir_version <= 10
        assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # symbolic batch
        assert [i.name for i in proto.graph.input] == ["input"] and [o.name for o in proto.graph.output] == ["logits"]
    assert compact.file_bytes < dense.file_bytes


@pytest.mark.parametrize("arch,channels,size", [("resnet18", 3, 8), ("conv6", 3, 8)])
def test_regen_logits_identical_to_dense(exported, arch, channels, size, tmp_path):
    """With batch norm folded into every convolution (resnet18) and without (conv6): the regenerated
    weights, as onnxruntime folds them, are the dense file's bit for bit, so the logits are identical."""
    entry = exported(arch, channels, size)
    result = export_onnx(entry.artifact, tmp_path / "regen.onnx", storage="regen", model=entry.model)
    x = inputs(entry.artifact, 6, seed=5)
    assert np.abs(run_ort(result.path, x) - run_ort(entry.dense.path, x)).max() == 0.0
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC  # constant folding only
    options.optimized_model_filepath = str(tmp_path / "folded.onnx")
    ort.InferenceSession(str(result.path), options)
    folded = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(tmp_path / "folded.onnx")).graph.initializer}
    weights = [t for t in onnx.load(str(entry.dense.path)).graph.initializer if len(t.dims) >= 2]
    assert len(weights) == len(entry.artifact.masks)
    for tensor in weights:
        assert folded[tensor.name].tobytes() == numpy_helper.to_array(tensor).tobytes(), tensor.name


def test_metadata_is_written_and_read_back(exported):
    entry = exported("conv2", 1, 8)
    artifact, result = entry.artifact, entry.compact
    proto = onnx.load(str(result.path))
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["maskforge.arch"] == "conv2"
    assert json.loads(meta["maskforge.arch_args"]) == artifact.arch_args
    assert float(meta["maskforge.k"]) == artifact.k and int(meta["maskforge.seed"]) == artifact.seed
    assert meta["maskforge.artifact_digest"] == artifact.digest
    assert meta["maskforge.storage"] == "compact" and "maskforge.onnx_format" not in meta  # 0.1's key: gone
    assert meta["maskforge.precision"] == "fp32"
    assert json.loads(meta["maskforge.class_names"]) == list(artifact.spec.class_names)
    pre = json.loads(meta["maskforge.preprocessing"])
    assert (pre["channels"], pre["height"], pre["width"]) == (1, 8, 8)
    assert pre["mean"] == list(artifact.spec.mean) and pre["std"] == list(artifact.spec.std)
    info = read_onnx_metadata(proto)
    assert info.spec == artifact.spec and info.storage == "compact"
    # onnxruntime exposes the same map to users of other languages
    session = ort.InferenceSession(str(result.path))
    assert session.get_modelmeta().custom_metadata_map["maskforge.artifact_digest"] == artifact.digest


@pytest.mark.parametrize(
    "arch,init", [("resnet18", "signed_constant"), ("conv2", "kaiming_normal"), ("fc", "unsigned_constant")]
)
def test_compact_weights_decode_to_the_dense_weights(exported, arch, init):
    channels, size = (3, 8) if arch == "resnet18" else (1, 8)
    entry = exported(arch, channels, size, init)
    compact, dense = onnx.load(str(entry.compact.path)), onnx.load(str(entry.dense.path))
    decoded = decode_compact(compact)
    dense_weights = {t.name: numpy_helper.to_array(t) for t in dense.graph.initializer}
    assert decoded and set(decoded) <= set(dense_weights)
    for name, weight in decoded.items():
        assert np.array_equal(weight, dense_weights[name]), name
    # no float weight is stored densely in the compact file
    assert not any(name in decoded for name in (t.name for t in compact.graph.initializer))
    kinds = {"signed_constant": "sign_packed", "kaiming_normal": "values", "unsigned_constant": "magnitude"}
    assert any(t.name.endswith(kinds[init]) for t in compact.graph.initializer)


def test_onnxruntime_folds_the_expansion_at_session_start(exported, tmp_path):
    path = exported("resnet18", 3, 8).compact.path
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC  # constant folding
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(path), options)
    ops = {node.op_type for node in onnx.load(str(tmp_path / "optimized.onnx")).graph.node}
    assert not ops & {"BitShift", "Mod", "CumSum", "Gather", "Where", "Cast", "Neg"}, ops


def test_compact_size_signed_constant_conv4(folder):
    """The claim: at most 2.05 bits per masked weight; signs are stored for kept weights only (~1 + k)."""
    for k in (0.5, 0.3):
        artifact = load_artifact(make_artifact(folder, "conv4", 1, 28, k=k, name=f"conv4-{k}.safetensors"))
        result = export_onnx(artifact, folder / f"conv4-{k}.onnx")
        bits = 8 * result.path.stat().st_size / artifact.masked_weights
        assert bits == pytest.approx(result.bits_per_weight)
        assert bits <= 2.05 and bits <= 1 + k + 0.1, bits


@pytest.mark.parametrize("opset", [13, 20])
def test_other_opsets_load_in_onnxruntime(folder, opset):
    artifact = load_artifact(make_artifact(folder, "fc", 1, 8))
    result = export_onnx(artifact, folder / f"fc-opset{opset}.onnx", opset=opset)
    proto = onnx.load(str(result.path))
    assert [o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")] == [opset]
    x = inputs(artifact, 3)
    with torch.no_grad():
        assert np.abs(run_ort(result.path, x) - materialize(artifact)(x).numpy()).max() <= 1e-4


def test_failed_parity_check_leaves_no_file(folder, tmp_path, monkeypatch):
    import maskforge.export.onnx_export as export_module

    real = export_module.trace_to_onnx

    def broken(model, spec, opset):
        proto = real(model, spec, opset)
        weight = proto.graph.initializer[0]
        array = numpy_helper.to_array(weight) * 2
        weight.CopyFrom(numpy_helper.from_array(array, weight.name))
        return proto

    monkeypatch.setattr(export_module, "trace_to_onnx", broken)
    with pytest.raises(MaskforgeError, match="onnxruntime and PyTorch disagree"):
        export_onnx(make_artifact(folder, "conv2", 1, 8), tmp_path / "bad.onnx")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------------------
# torch export
# ---------------------------------------------------------------------------------------------------------


def test_torch_export_round_trip(exported, tmp_path):
    entry = exported("conv4", 1, 8)
    path = entry.artifact.path
    result = export_torch(path, tmp_path / "m.safetensors")
    model = load_torch_export(result.path)
    reference = entry.model
    x = inputs(entry.artifact, 4)
    with torch.no_grad():
        assert torch.equal(model(x), reference(x))
    assert not model.training and result.max_abs_diff == 0.0
    with pytest.raises(MaskforgeError, match="not a maskforge torch export"):
        load_torch_export(path)  # an artifact is a safetensors file too, but not this kind


# ---------------------------------------------------------------------------------------------------------
# the command line
# ---------------------------------------------------------------------------------------------------------


def test_cli_export_default_paths_and_json(tmp_path):
    path = make_artifact(tmp_path, "fc", 1, 8, name="artifact.safetensors")
    runner = CliRunner()
    for argv, expected in [
        ([], "artifact.onnx"),
        (["--storage", "dense"], "artifact.dense.onnx"),
        (["--format", "torch"], "artifact.torch.safetensors"),
    ]:
        result = runner.invoke(app, ["export", str(path), "--json", *argv])
        assert result.exit_code == 0, result.stderr
        report = json.loads(result.stdout)
        assert Path(report["path"]) == tmp_path / expected and (tmp_path / expected).exists()
        assert report["file_bytes"] == (tmp_path / expected).stat().st_size
    assert default_export_path(path, "onnx", storage="dense") == tmp_path / "artifact.dense.onnx"
    result = runner.invoke(app, ["export", str(path), "--out", str(tmp_path / "x.onnx")])
    assert result.exit_code == 0 and re.search(r"bits per masked weight", " ".join(result.stdout.split()))


@pytest.mark.parametrize("case", ["missing folder, digest fails", "under a file", "truncated artifact", "digest fails"])
def test_cli_export_bad_input_is_one_line_exit_2_and_leaves_nothing(tmp_path, case):
    good = make_artifact(tmp_path, "fc", 1, 8, name="good.safetensors")
    (tmp_path / "plain").write_text("x")
    artifact, out = good, tmp_path / "out.onnx"
    if case.startswith("missing folder"):  # the folder would be created, but the export fails first
        out = tmp_path / "nope" / "deeper" / "out.onnx"
    if case == "under a file":
        out = tmp_path / "plain" / "out.onnx"
    elif case == "truncated artifact":
        artifact = tmp_path / "cut.safetensors"
        artifact.write_bytes(good.read_bytes()[:200])
    elif case.endswith("digest fails"):  # a mask byte flipped: the tensor digest no longer matches
        data = bytearray(good.read_bytes())
        data[-5] ^= 1
        artifact = tmp_path / "flipped.safetensors"
        artifact.write_bytes(bytes(data))
    before = sorted(p.name for p in tmp_path.rglob("*"))
    result = CliRunner().invoke(app, ["export", str(artifact), "--out", str(out)])
    assert result.exit_code == 2
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.stderr
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


@pytest.mark.parametrize(
    "metadata",
    [
        "{not json",
        '{"arch": {}}',
        '{"arch": {"name": "fc", "args": {}}, "k": "x"}',
        '{"arch": {"name": "fc", "args": {}}, "k": 0.5}',
    ],
)
def test_torch_export_with_damaged_metadata_is_a_clear_error(tmp_path, metadata):
    from safetensors.torch import save_file

    from maskforge.export import TORCH_EXPORT_KEY, load_torch_export

    path = tmp_path / "damaged.safetensors"
    save_file({"weight": torch.zeros(1)}, str(path), metadata={TORCH_EXPORT_KEY: metadata})
    with pytest.raises(MaskforgeError):
        load_torch_export(path)

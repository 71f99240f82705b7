"""Any model (maskforge.convert): torchvision's zoo and the user's own nn.Module, searched and shipped.

Oracles: weight counts from the builder's own (unconverted) model, torchvision's ResNet-18 against the
built-in one, the regenerated embedding against the generator's lower-level functions, ONNX regen files
against dense ones, and files edited by hand. Large members are built on the meta device or on small
inputs; the searches that learn are in test_convert_slow.py.
"""

from __future__ import annotations

import json
import textwrap

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn

from helpers import perturb_like_search
from maskforge import archs, convert, regen
from maskforge.artifact import artifact_bytes, artifact_from_bytes, build_artifact, load_artifact, save_artifact
from maskforge.data import load_data
from maskforge.errors import MaskforgeError
from maskforge.layers import ProjectedAttention, masked_modules
from maskforge.materialization import materialize
from maskforge.schema import SearchConfig

VIT_ARGS = {"image_size": 28, "patch_size": 4, "num_layers": 2, "num_heads": 4, "hidden_dim": 64, "mlp_dim": 128}

# (reference, builder args, in_channels, side): the zoo members of issue 15 on inputs their strides allow
ZOO = [
    ("torchvision:mobilenet_v3_small", None, 1, 28),
    ("torchvision:efficientnet_b0", None, 3, 32),
    ("torchvision:densenet121", None, 3, 32),
    ("torchvision:regnet_x_400mf", None, 3, 32),
    ("torchvision:convnext_tiny", None, 3, 32),
    ("torchvision:VisionTransformer", VIT_ARGS, 1, 28),
]

USER_MODULE = textwrap.dedent("""
    import torch.nn as nn


    class Net(nn.Module):
        def __init__(self, in_channels, num_classes, width=8):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU())
            self.dw = nn.Sequential(nn.Conv2d(width, width, 3, padding=1, groups=width), nn.GroupNorm(2, width),
                                    nn.ReLU(), nn.MaxPool2d(2))
            self.mix = nn.Conv1d(width, KERNEL_OUT, 3, padding=1)
            self.head = nn.Sequential(nn.LayerNorm(KERNEL_OUT), nn.Dropout(0.2), nn.Linear(KERNEL_OUT, num_classes))

        def forward(self, x):
            x = self.mix(self.dw(self.stem(x)).flatten(2)).relu()
            return self.head(x.mean(2))


    def build(in_channels, num_classes, width=8):
        return Net(in_channels, num_classes, width)
""")


def _write_user_module(folder, out_channels: int = 16, name: str = "usernet.py"):
    path = folder / name
    path.write_text(USER_MODULE.replace("KERNEL_OUT", str(out_channels)))
    return path


def _args(reference, builder_args, channels, side, classes=10):
    return archs.arch_args(channels, classes, (side, side), builder_args=builder_args)


def _expected_masked_weights(source: nn.Module) -> int:
    """From the builder's own model: every conv/linear weight, and attention's packed projections."""
    attention = [m for m in source.modules() if isinstance(m, nn.MultiheadAttention)]
    inside = {id(m.out_proj) for m in attention}
    total = sum(m.in_proj_weight.numel() + m.out_proj.weight.numel() for m in attention)
    return total + sum(
        m.weight.numel()
        for m in source.modules()
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)) and id(m) not in inside
    )


@pytest.mark.parametrize("reference,builder_args,channels,side", ZOO, ids=[z[0].split(":")[1] for z in ZOO])
def test_zoo_members_follow_the_conversion_rules(reference, builder_args, channels, side):
    args = _args(reference, builder_args, channels, side)
    source = convert.source_model(reference, args)
    expected = _expected_masked_weights(source)
    with torch.device("meta"):
        model = archs.build_structure(reference, args, 0.5)
    layers = masked_modules(model)
    assert sum(layer.weight.numel() for layer in layers.values()) == expected
    assert archs.count_masked_weights(reference, args) == expected
    # the scores are the only parameters; no bias, no affine norm, no dropout survives
    assert {name.rsplit(".", 1)[1] for name, _ in model.named_parameters()} == {"scores"}
    for module in model.modules():
        assert not isinstance(module, (nn.Dropout, nn.MultiheadAttention))
        assert type(module).__name__ != "StochasticDepth"
        if isinstance(module, (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)):
            assert getattr(module, "weight", None) is None and getattr(module, "bias", None) is None
    fixed = convert.fixed_tensors(model)
    if "VisionTransformer" in reference:
        assert fixed == {"class_token": "zeros", "encoder.pos_embedding": "N(0, 0.02^2) from the seed"}
        assert sum(isinstance(m, ProjectedAttention) for m in model.modules()) == 2
    elif "convnext" in reference:
        assert len(fixed) == 18 and set(fixed.values()) == {"ones"}
    else:
        assert fixed == {}
    if channels != 3:  # the stem takes the data's channels
        first = next(iter(layers.values()))
        assert first.weight.shape[1] == channels


def test_torchvision_resnet18_gives_the_builtin_weights_bit_for_bit():
    kwargs = dict(in_channels=3, num_classes=10, image_size=(224, 224), k=0.4, seed=7)
    builtin = archs.create_model("resnet18", **kwargs)
    zoo = archs.create_model("torchvision:resnet18", **kwargs)
    ours, theirs = masked_modules(builtin), masked_modules(zoo)
    assert list(ours) == list(theirs)
    for name in ours:
        assert torch.equal(ours[name].weight, theirs[name].weight), name
        assert torch.equal(ours[name].scores, theirs[name].scores), name
    assert list(builtin.state_dict()) == list(zoo.state_dict())
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(builtin.eval()(x), zoo.eval()(x))


def test_vit_position_embedding_is_regenerated_from_the_seed():
    model = archs.create_model(
        "torchvision:VisionTransformer",
        in_channels=1,
        num_classes=10,
        image_size=(28, 28),
        seed=5,
        builder_args=VIT_ARGS,
    )
    name, shape = "encoder.pos_embedding", (1, 50, 64)
    # independent of regen.normal: the generator's blocks through its Gaussian, scaled in float64
    blocks = regen.raw_blocks(5, name, 50 * 64)
    expected = (regen.standard_normal(blocks) * 0.02).astype(np.float32).reshape(shape)
    assert np.array_equal(model.encoder.pos_embedding.numpy(), expected)
    assert not model.encoder.pos_embedding.requires_grad
    assert torch.equal(model.class_token, torch.zeros(1, 1, 64))


def _artifact(reference, builder_args, channels, side, seed=1):
    spec = load_data("mnist5k").spec
    assert (spec.channels, spec.height) == (channels, side)
    model = archs.create_model(
        reference,
        in_channels=channels,
        num_classes=10,
        image_size=(side, side),
        k=0.5,
        seed=seed,
        builder_args=builder_args,
    )
    perturb_like_search(model, seed, score_noise=0.1, bn_mean_scale=0.1, bn_var_floor=0.5)
    return build_artifact(
        model.eval(),
        arch=reference,
        arch_args=_args(reference, builder_args, channels, side),
        spec=spec,
        seed=seed,
        init="signed_constant",
        scale_fan=False,
        k=0.5,
        provenance={"data": "mnist5k", "epochs": 0},
    )


def _logits(path, x):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


@pytest.mark.parametrize(
    "reference,builder_args",
    [
        ("torchvision:VisionTransformer", VIT_ARGS),
        pytest.param("torchvision:mobilenet_v3_small", None, marks=pytest.mark.slow),  # about a minute
        ("user", None),
    ],
)
def test_artifact_materialize_export_and_verify(tmp_path, monkeypatch, reference, builder_args):
    from maskforge.export import export_onnx, export_torch, load_torch_export
    from maskforge.verify import verify_artifact, verify_onnx

    if reference == "user":
        monkeypatch.chdir(tmp_path)
        _write_user_module(tmp_path)
        reference = "usernet.py:build"
        convert.trust(reference)
    artifact = _artifact(reference, builder_args, 1, 28)
    path = save_artifact(artifact, tmp_path / "a.safetensors")
    loaded = load_artifact(path)
    assert loaded.meta.arch.structure_digest == convert.structure_digest(loaded.meta.arch.structure)
    assert loaded.meta.arch.library.startswith("torchvision " if reference.startswith("torchvision") else "user code")
    x = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(3))
    plain = materialize(loaded)
    assert not masked_modules(plain) and not any(p.requires_grad for p in plain.parameters())
    with torch.no_grad():
        searched, baked = loaded.create_model()(x), plain(x)
    torch.testing.assert_close(baked, searched, rtol=0, atol=1e-5)
    assert verify_artifact(path).ok
    # ONNX: regen (weights rebuilt by the graph) computes exactly what the dense file computes
    regen_file = export_onnx(loaded, tmp_path / "regen.onnx", storage="regen").path
    dense_file = export_onnx(loaded, tmp_path / "dense.onnx", storage="dense").path
    assert np.array_equal(_logits(regen_file, x.numpy()), _logits(dense_file, x.numpy()))
    np.testing.assert_allclose(_logits(dense_file, x.numpy()), searched.numpy(), rtol=0, atol=1e-4)
    assert verify_onnx(regen_file, path).ok
    torch_file = export_torch(loaded, tmp_path / "torch.safetensors").path
    with torch.no_grad():
        assert torch.equal(load_torch_export(torch_file)(x), baked)


def test_user_code_needs_trust_and_a_changed_structure_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _write_user_module(tmp_path, name="drift.py")
    reference = "drift.py:build"
    convert.trust(reference)
    path = save_artifact(_artifact(reference, None, 1, 28), tmp_path / "a.safetensors")
    data = path.read_bytes()
    convert._trusted.discard(reference)
    with pytest.raises(MaskforgeError, match=r"is user code.*MASKFORGE_TRUST_CODE=drift.py:build"):
        artifact_from_bytes(data)
    monkeypatch.setenv(convert.TRUST_ENV, "other.py:build, drift.py:build")
    assert artifact_from_bytes(data).arch == reference
    # the module is edited: its Conv1d now has 24 outputs (the first difference is that weight)
    _write_user_module(tmp_path, out_channels=24, name="drift.py")
    convert._file_modules.clear()
    with pytest.raises(MaskforgeError) as refused:
        artifact_from_bytes(data)
    message = str(refused.value)
    assert "\n" not in message
    assert "no longer builds the searched network" in message
    assert "recorded 'mix.weight param 16x8x3 Conv1d', the code now gives 'mix.weight param 24x8x3 Conv1d'" in message


def test_another_torchvision_version_with_the_same_structure_loads():
    artifact = _artifact("torchvision:VisionTransformer", VIT_ARGS, 1, 28)
    artifact.document["arch"]["library"] = "torchvision 0.1.0"
    loaded = artifact_from_bytes(artifact_bytes(artifact))  # resealed with the edited library
    assert loaded.meta.arch.library == "torchvision 0.1.0"
    # a recorded structure that this torchvision does not build is refused, naming the entry
    entries = list(artifact.document["arch"]["structure"])
    entries[3] = entries[3].replace("64", "65", 1)
    artifact.document["arch"]["structure"] = entries
    artifact.document["arch"]["structure_digest"] = convert.structure_digest(entries)
    with pytest.raises(MaskforgeError, match=r"entry 3: recorded .*65"):
        artifact_from_bytes(artifact_bytes(artifact))


def test_models_without_a_rule_are_refused_naming_the_parameter(tmp_path, monkeypatch):
    args = archs.arch_args(3, 10, (224, 224))
    with pytest.raises(
        MaskforgeError,
        match=r"parameter features\.1\.0\.attn\.relative_position_bias_table "
        r"\(ShiftedWindowAttention",
    ):
        archs.build_structure("torchvision:swin_t", args, 0.5)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "odd.py").write_text(
        textwrap.dedent("""
        import torch, torch.nn as nn

        class Scaled(nn.Module):
            def __init__(self, num_classes):
                super().__init__()
                self.fc = nn.Linear(784, num_classes)
                self.gain = nn.Parameter(torch.ones(num_classes))

            def forward(self, x):
                return self.fc(x.flatten(1)) * self.gain

        class Buffered(Scaled):
            def __init__(self, num_classes):
                nn.Module.__init__(self)
                self.fc = nn.Linear(784, num_classes)
                self.register_buffer("gain", torch.arange(num_classes).float())
    """)
    )
    for name, what in (("Scaled", "parameter gain"), ("Buffered", "buffer gain")):
        convert.trust(f"odd.py:{name}")
        with pytest.raises(MaskforgeError, match=f"architecture odd.py:{name}: {what} "):
            archs.build_structure(f"odd.py:{name}", archs.arch_args(1, 10, (28, 28)), 0.5)


def test_builders_that_do_not_fit_the_data_are_refused_in_one_line():
    with pytest.raises(MaskforgeError, match=r"torchvision:VisionTransformer cannot take 1x28x28 images: .*"):
        archs.build_structure(
            "torchvision:VisionTransformer",
            archs.arch_args(1, 10, (28, 28), builder_args={**VIT_ARGS, "image_size": 32}),
            0.5,
        )
    with pytest.raises(MaskforgeError, match="torchvision has no classification model 'nonet'"):
        archs.build_structure("torchvision:nonet", archs.arch_args(3, 10, (32, 32)), 0.5)
    with pytest.raises(MaskforgeError, match=r"refused its arguments .*depth"):
        archs.build_structure("torchvision:resnet18", archs.arch_args(3, 10, (32, 32), builder_args={"depth": 3}), 0.5)


def test_search_config_arch_args_are_checked():
    assert SearchConfig(arch="torchvision:VisionTransformer", arch_args=json.dumps(VIT_ARGS)).builder_args() == VIT_ARGS
    for arch, text, match in (
        ("conv4", "{}", "not to the registered architecture conv4"),
        ("torchvision:resnet18", "[1]", "JSON object"),
        ("torchvision:resnet18", "{bad", "not JSON"),
        ("torchvision:resnet18", '{"weights": "DEFAULT"}', "weights is not accepted"),
    ):
        with pytest.raises(MaskforgeError, match=match):
            SearchConfig(arch=arch, arch_args=text)


def test_a_builder_callable_searches_in_process(tmp_path):
    from maskforge.searches import search

    def tiny(num_classes):
        return nn.Sequential(
            nn.Conv2d(3, 4, 3),
            nn.BatchNorm2d(4),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(4, num_classes),
        )

    reference = convert.builder_reference(tiny, "tests.tiny:build")
    folder = tmp_path / "run"
    from helpers import write_image_folder

    data = write_image_folder(tmp_path / "images", 8, 4)
    result = search(
        SearchConfig(arch=reference, data=str(data), max_steps=2, epochs=1, batch_size=8, out=str(folder), device="cpu")
    )
    artifact = load_artifact(result.artifact_path)
    assert artifact.arch == "tests.tiny:build" and artifact.meta.arch.library.startswith("user code")
    assert (folder / "artifact.safetensors").exists()


def test_zoo_listing_counts_or_says_why(monkeypatch):
    monkeypatch.setattr(convert, "torchvision_builders", lambda: ["mobilenet_v3_small", "swin_t", "alexnet"])
    rows = {row["name"]: row for row in convert.zoo(3, 10, (32, 32))}
    source = convert.source_model("torchvision:mobilenet_v3_small", archs.arch_args(3, 10, (32, 32)))
    assert rows["torchvision:mobilenet_v3_small"] == {
        "name": "torchvision:mobilenet_v3_small",
        "weights": _expected_masked_weights(source),
        "why": "",
    }
    assert rows["torchvision:swin_t"]["weights"] is None
    assert "relative_position_bias_table" in rows["torchvision:swin_t"]["why"]
    assert rows["torchvision:alexnet"]["why"].startswith("cannot take 3x32x32 images")


def test_global_topk_and_a_sweep_grid_take_builder_references(tmp_path):
    from maskforge.layers import set_topk
    from maskforge.sweeps.grid import make_grid, options_from_text

    model = archs.create_model(
        "torchvision:VisionTransformer",
        in_channels=1,
        num_classes=10,
        image_size=(28, 28),
        k=0.3,
        seed=2,
        builder_args=VIT_ARGS,
    )
    selector = set_topk(model, "global")
    perturb_like_search(model, 4, score_noise=0.1, bn_mean_scale=0.1, bn_var_floor=0.5)
    artifact = build_artifact(
        model.eval(),
        arch="torchvision:VisionTransformer",
        arch_args=_args("torchvision:VisionTransformer", VIT_ARGS, 1, 28),
        spec=load_data("mnist5k").spec,
        seed=2,
        init="signed_constant",
        scale_fan=False,
        k=0.3,
        topk="global",
    )
    loaded = artifact_from_bytes(artifact_bytes(artifact))
    assert loaded.topk == "global"
    for name, mask in zip(masked_modules(model), selector.masks()):
        assert torch.equal(loaded.masks[f"{name}.weight"], mask)
    options = options_from_text(
        {"arch": "torchvision:VisionTransformer", "arch_args": json.dumps(VIT_ARGS), "k": "0.3,0.5"}
    )
    grid = make_grid(options, dense_baseline=True)
    points = grid.points(tmp_path)
    assert [p.kind for p in points] == ["search", "search", "dense"]
    assert all(p.config.arch_args == json.dumps(VIT_ARGS) for p in points)
    assert all("/" not in p.name and ":" not in p.name for p in points)


@pytest.mark.parametrize("batch_first", [True, False])
def test_projected_attention_computes_what_multihead_attention_does(batch_first):
    torch.manual_seed(0)
    reference = nn.MultiheadAttention(16, 4, batch_first=batch_first)
    with torch.no_grad():
        reference.in_proj_bias.zero_()
        reference.out_proj.bias.zero_()
    with torch.device("meta"):
        holder = nn.Sequential(nn.MultiheadAttention(16, 4, batch_first=batch_first))
    convert.convert(holder, 0.5)
    weights = {"0.in_proj": reference.in_proj_weight, "0.out_proj": reference.out_proj.weight}
    convert.plain_layers(holder, weight_of=lambda name, layer: weights[name].detach().clone())
    attention = holder[0]
    assert isinstance(attention, ProjectedAttention)
    x = torch.randn((2, 5, 16) if batch_first else (5, 2, 16))
    y = torch.randn_like(x)
    for query, key, value in ((x, x, x), (x, y, y)):
        expected, expected_weights = reference(query, key, value)
        got, got_weights = attention(query, key, value)
        torch.testing.assert_close(got, expected)
        torch.testing.assert_close(got_weights, expected_weights)

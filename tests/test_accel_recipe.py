"""The accelerator recipe on the CPU (issue 11 item 2): `precision="bf16"`, `channels_last`, `masker="torch"`
and `compile` make a CPU search run the code a GPU search runs, device aside.

* oracle: a search with the torch masker writes the numpy masker's masks and batch-norm statistics, bit
  for bit (fp32; per-layer and global top-k); the two artifacts differ only in the recorded masker;
* the recipe learns: conv4 on demo images, held-out accuracy within a few points of fp32, and its
  artifact verifies, exports, and scores the same in onnxruntime (fp32) as the search measured (bf16);
* a recipe search killed and resumed writes the uninterrupted search's artifact byte for byte, so the
  recipe is deterministic on the CPU; so is `deterministic`, which changes no bit there;
* `compile` (inductor, C++ kernels on the CPU) trains and writes exact top-k masks (a tiny run here; the
  long runs are `slow`);
* the device's defaults: CUDA picks the fast recipe, the CPU the plain one (resolved, no kernel run).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from helpers import write_image_folder
from maskforge import archs
from maskforge.artifact import load_artifact
from maskforge.checkpoint import CHECKPOINT_NAME, load_checkpoint
from maskforge.errors import MaskforgeError
from maskforge.layers import MaskedConv2d, MaskedLinear, NonAffineBatchNorm2d, kept_count, masked_modules, set_topk
from maskforge.searches import SearchConfig, resume, search
from maskforge.searches import device as device_module
from maskforge.searches.device import Accelerator
from maskforge.topk import MASKERS

RECIPE = dict(precision="bf16", channels_last=True, masker="torch")


@pytest.fixture(scope="module")
def small_data(tmp_path_factory) -> str:
    """An image folder of 8x8 RGB images, two classes, 128 training and 32 held-out (augmented in training)."""
    return str(write_image_folder(tmp_path_factory.mktemp("accel_small"), 64, 16))


def _build_bn_net(in_channels: int, num_classes: int, image_size, k: float = 0.5) -> nn.Module:
    side = image_size[0] // 2 // 2
    return nn.Sequential(
        MaskedConv2d(in_channels, 8, 3, padding=1, k=k),
        NonAffineBatchNorm2d(8),
        nn.ReLU(),
        nn.MaxPool2d(2),
        MaskedConv2d(8, 16, 3, padding=1, k=k),
        NonAffineBatchNorm2d(16),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        MaskedLinear(16 * side * side, num_classes, k=k),
    )


def _build_tiny_net(in_channels: int, num_classes: int, image_size, k: float = 0.5) -> nn.Module:
    side = (image_size[0] - 3) // 2 + 1
    return nn.Sequential(
        MaskedConv2d(in_channels, 4, 3, stride=2, k=k),
        NonAffineBatchNorm2d(4),
        nn.ReLU(),
        nn.Flatten(),
        MaskedLinear(4 * side * side, num_classes, k=k),
    )


@pytest.fixture
def tiny_net():
    """One conv, one batch norm, one linear: the least a compiled conv search needs (inductor compiles
    every kernel with the C++ compiler; a first run on an empty cache takes ~20 s on 2 loaded cores)."""
    archs.register_arch("_accel_tiny", "test-only conv + BN + linear")(_build_tiny_net)
    yield "_accel_tiny"
    archs.ARCHS.pop("_accel_tiny")


@pytest.fixture
def bn_net():
    """A small conv net with batch norm and max pooling, registered for one test."""
    archs.register_arch("_accel_bn", "test-only conv + BN + max pool")(_build_bn_net)
    yield "_accel_bn"
    archs.ARCHS.pop("_accel_bn")


def _run(tmp_path: Path, name: str, **values):
    config = dict(epochs=1, batch_size=32, workers=0, device="cpu", out=str(tmp_path / name))
    config.update(values)
    return search(SearchConfig(**config))


def _tensor_bytes(artifact) -> dict[str, bytes]:
    """Masks (as bools) and BN statistics (float32 bits) by name."""
    found = {f"mask/{name}": mask.numpy().tobytes() for name, mask in artifact.masks.items()}
    found.update({f"bn/{name}": stat.numpy().astype("<f4").tobytes() for name, stat in artifact.bn_stats.items()})
    return found


def _without(document: dict, *paths: str) -> dict:
    """A copy of `document` without the dotted `paths`."""
    copy = {key: dict(value) if isinstance(value, dict) else value for key, value in document.items()}
    for path in paths:
        first, _, rest = path.partition(".")
        if rest:
            copy[first].pop(rest)
        else:
            copy.pop(first)
    return copy


# ---------------------------------------------------------------------------------------------------------
# both maskers, one result
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("topk", ["layer", "global"])
def test_torch_masker_search_writes_the_numpy_masker_masks_and_statistics(tmp_path, small_data, bn_net, topk):
    common = dict(arch=bn_net, data=small_data, k=0.3, topk=topk, epochs=2, lr=0.2)
    artifacts = {masker: _run(tmp_path, masker, masker=masker, **common).artifact for masker in MASKERS}
    numpy_art, torch_art = artifacts["numpy"], artifacts["torch"]
    assert _tensor_bytes(torch_art) == _tensor_bytes(numpy_art)
    # The search really moved the masks and the statistics away from where they started.
    start = archs.create_model(bn_net, **numpy_art.arch_args, k=0.3, seed=0)
    set_topk(start, topk)
    start_masks = {f"{name}.weight": layer.mask() for name, layer in masked_modules(start).items()}
    assert all(not torch.equal(numpy_art.masks[name], mask) for name, mask in start_masks.items())
    assert all(stat.abs().sum() > 0 for name, stat in numpy_art.bn_stats.items() if name.endswith("mean"))
    # The documents differ in the recorded masker (and so in the document digest) only.
    assert (numpy_art.document["provenance"]["masker"], torch_art.document["provenance"]["masker"]) == (
        "numpy",
        "torch",
    )
    ignored = ("provenance", "digests.document")
    assert _without(torch_art.document, *ignored) == _without(numpy_art.document, *ignored)
    assert {**torch_art.document["provenance"], "masker": "numpy"} == numpy_art.document["provenance"]
    if topk == "global":  # the layers keep different fractions, the total is the global rule's
        densities = {info["density"] for info in numpy_art.document["layers"].values()}
        assert len(densities) > 1
        sizes = [mask.numel() for mask in numpy_art.masks.values()]
        assert numpy_art.kept_weights == max(len(sizes), round(0.3 * sum(sizes)))


# ---------------------------------------------------------------------------------------------------------
# the recipe learns, and its artifact is an ordinary one
# ---------------------------------------------------------------------------------------------------------


def test_recipe_conv4_learns_like_fp32_and_its_artifact_verifies_and_exports(tmp_path):
    from maskforge.evaluation import evaluate
    from maskforge.export import export_onnx
    from maskforge.verify import verify_artifact

    common = dict(arch="conv4", data="mnist5k", max_steps=20, batch_size=64)  # 20 steps: 65 % here
    fp32 = _run(tmp_path, "fp32", **common)
    recipe = _run(tmp_path, "recipe", **common, **RECIPE)
    assert recipe.heldout_acc >= 0.6, recipe.metrics  # chance is 0.1
    assert abs(recipe.heldout_acc - fp32.heldout_acc) <= 0.04, (recipe.heldout_acc, fp32.heldout_acc)
    provenance = recipe.artifact.document["provenance"]
    assert {key: provenance[key] for key in ("device", "precision", "channels_last", "masker", "compile")} == {
        "device": "cpu",
        "precision": "bf16",
        "channels_last": True,
        "masker": "torch",
        "compile": False,
    }

    assert verify_artifact(recipe.artifact_path).ok
    exported = export_onnx(recipe.artifact_path, tmp_path / "recipe.onnx")
    report = evaluate(exported.path, split="test", latency=None, memory=False)
    # onnxruntime in float32 on the masks the bf16 search found, against the search's own bf16 evaluation
    assert abs(report.accuracy.top1 - recipe.heldout_acc) <= 0.02, (report.accuracy.top1, recipe.heldout_acc)


# ---------------------------------------------------------------------------------------------------------
# resume and determinism
# ---------------------------------------------------------------------------------------------------------


class _Crash(Exception):
    pass


def _crash_at(step: int):
    def on_step(progress):
        if progress.step == step:
            raise _Crash()

    return on_step


def test_recipe_resume_writes_the_uninterrupted_artifact(tmp_path, small_data, bn_net):
    common = dict(
        arch=bn_net, data=small_data, epochs=2, batch_size=16, workers=0, device="cpu", k=0.4, warmup_epochs=1, **RECIPE
    )
    reference = search(SearchConfig(**common, out=str(tmp_path / "ref")))
    run = tmp_path / "run"
    with pytest.raises(_Crash):  # step 11 of 16, in the second epoch; the checkpoint is the one of step 10
        search(SearchConfig(**common, checkpoint_every=5, out=str(run)), on_step=_crash_at(11))
    assert load_checkpoint(run / CHECKPOINT_NAME).position["step"] == 10
    resume(run)
    assert (run / "artifact.safetensors").read_bytes() == (tmp_path / "ref" / "artifact.safetensors").read_bytes()
    assert reference.artifact.document["provenance"]["precision"] == "bf16"


def test_deterministic_changes_no_bit_on_the_cpu(tmp_path, small_data, bn_net):
    common = dict(arch=bn_net, data=small_data, k=0.4)
    plain = _run(tmp_path, "plain", **common).artifact
    strict = _run(tmp_path, "strict", **common, deterministic=True).artifact
    assert _tensor_bytes(strict) == _tensor_bytes(plain)
    assert (strict.document["provenance"]["deterministic"], plain.document["provenance"]["deterministic"]) == (
        True,
        False,
    )


# ---------------------------------------------------------------------------------------------------------
# torch.compile with inductor on the CPU
# ---------------------------------------------------------------------------------------------------------


def _sort_oracle(scores: torch.Tensor, kept: int) -> torch.Tensor:
    order = torch.sort(scores.abs().reshape(-1), descending=True, stable=True).indices[:kept]
    mask = torch.zeros(scores.numel(), dtype=torch.bool)
    mask[order] = True
    return mask.view(scores.shape)


def test_compiled_recipe_trains_and_keeps_exact_masks(tmp_path, small_data, tiny_net, monkeypatch):
    compiled = []
    real_compile = torch.compile

    def spy(model, *args, **kwargs):
        compiled.append(kwargs.get("backend", "inductor"))
        return real_compile(model, *args, **kwargs)

    monkeypatch.setattr(torch, "compile", spy)
    result = _run(
        tmp_path, "compiled", arch=tiny_net, data=small_data, max_steps=3, compile=True, keep_checkpoint=True, **RECIPE
    )
    assert compiled == ["inductor"]
    provenance = result.artifact.document["provenance"]
    assert (provenance["compile"], provenance["masker"], provenance["precision"]) == (True, "torch", "bf16")
    assert provenance["steps"] == 3
    scores = load_checkpoint(Path(result.artifact_path).parent / CHECKPOINT_NAME).tensors
    for param, mask in result.artifact.masks.items():
        layer_scores = torch.as_tensor(np.asarray(scores[f"scores/{param.rsplit('.', 1)[0]}.scores"]))
        assert torch.equal(mask, _sort_oracle(layer_scores, kept_count(mask.numel(), 0.5))), param
    load_artifact(result.artifact_path)


@pytest.mark.slow
def test_compiled_recipe_on_the_demo_learns_like_fp32_and_resumes(tmp_path):
    """conv4 on the whole demo set, 2 epochs: fp32 eager, the eager recipe and the compiled recipe reach
    held-out accuracies within 2 points; the compiled recipe killed and resumed gives its artifact again."""
    common = dict(arch="conv4", data="mnist5k", epochs=2, batch_size=128, workers=0, device="cpu")
    fp32 = search(SearchConfig(**common, out=str(tmp_path / "fp32")))
    eager = search(SearchConfig(**common, **RECIPE, out=str(tmp_path / "eager")))
    compiled = search(SearchConfig(**common, **RECIPE, compile=True, out=str(tmp_path / "compiled")))
    accuracies = [fp32.heldout_acc, eager.heldout_acc, compiled.heldout_acc]
    assert min(accuracies) >= 0.9 and max(accuracies) - min(accuracies) <= 0.02, accuracies
    run = tmp_path / "run"
    with pytest.raises(_Crash):
        search(SearchConfig(**common, **RECIPE, compile=True, checkpoint_every=20, out=str(run)), on_step=_crash_at(45))
    resume(run)
    assert (run / "artifact.safetensors").read_bytes() == (tmp_path / "compiled" / "artifact.safetensors").read_bytes()


# ---------------------------------------------------------------------------------------------------------
# the device's defaults
# ---------------------------------------------------------------------------------------------------------


def _conv_model() -> nn.Module:
    return _build_bn_net(1, 10, (8, 8))


@pytest.mark.parametrize("has_bf16", [True, False])
def test_cuda_defaults_to_the_fast_recipe(monkeypatch, has_bf16):
    """Resolved for a CUDA device (faked: nothing runs on it)."""
    monkeypatch.setattr(device_module, "bf16_supported", lambda device: has_bf16)
    chosen = Accelerator.resolve(SearchConfig(), torch.device("cuda", 0), _conv_model())
    assert (chosen.precision, chosen.channels_last, chosen.masker, chosen.compile, chosen.deterministic) == (
        "bf16" if has_bf16 else "fp32",
        True,
        "torch",
        False,
        False,
    )
    forced = Accelerator.resolve(
        SearchConfig(precision="fp32", channels_last=False, masker="numpy"), torch.device("cuda", 0), _conv_model()
    )
    assert (forced.precision, forced.channels_last, forced.masker) == ("fp32", False, "numpy")


def test_cpu_defaults_and_the_recipe_on_the_cpu():
    cpu = torch.device("cpu")
    plain = Accelerator.resolve(SearchConfig(), cpu, _conv_model())
    assert (plain.precision, plain.channels_last, plain.masker, plain.compile) == ("fp32", False, "numpy", False)
    recipe = Accelerator.resolve(SearchConfig(**RECIPE), cpu, _conv_model())
    assert (recipe.precision, recipe.channels_last, recipe.masker) == ("bf16", True, "torch")
    # compiling picks the traceable masker; channels_last means nothing without convolutions
    fc = archs.create_model("fc", in_channels=1, num_classes=10, image_size=(8, 8), k=0.5)
    compiled = Accelerator.resolve(SearchConfig(compile=True, channels_last=True), cpu, fc)
    assert (compiled.masker, compiled.channels_last, compiled.compile) == ("torch", False, True)


def test_bf16_where_the_device_has_none_is_refused(monkeypatch):
    monkeypatch.setattr(device_module, "bf16_supported", lambda device: False)
    with pytest.raises(MaskforgeError) as caught:
        Accelerator.resolve(SearchConfig(precision="bf16"), torch.device("cuda", 0), _conv_model())
    assert str(caught.value) == (
        "precision 'bf16' was requested but device cuda:0 has no bfloat16 support "
        "(a GPU of compute capability 8.0 or newer has it); use precision fp32"
    )


@pytest.mark.parametrize("device_type,variable,default", [("cpu", "CXX", "g++"), ("cuda", "CC", "gcc")])
def test_compile_toolchain_lookup(monkeypatch, tmp_path, device_type, variable, default):
    if device_type == "cuda":
        pytest.importorskip("triton")
    monkeypatch.setenv(variable, str(tmp_path / "no-such-compiler"))
    problem = device_module.compile_toolchain_problem(device_type)
    what = (
        "a C++ compiler for inductor's CPU kernels"
        if device_type == "cpu"
        else "a C compiler for Triton's kernel launchers"
    )
    assert (
        problem == f"needs {what}: {variable}={tmp_path / 'no-such-compiler'} names no program that "
        f"exists on this machine"
    )
    fake = tmp_path / "bin" / default
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    monkeypatch.delenv(variable)
    monkeypatch.setenv("PATH", str(fake.parent))
    assert device_module.compile_toolchain_problem(device_type) is None
    monkeypatch.setenv("PATH", str(tmp_path))
    assert device_module.compile_toolchain_problem(device_type).endswith(
        "on PATH, or " + variable + "), and none was found"
    )

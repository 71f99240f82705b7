"""Tests for maskforge.search on the built-in demo data: the weights never change, the result is a pure
function of the config, metrics are what they claim, the held-out split is never trained on, and bad
input fails before anything is written."""

from __future__ import annotations

import hashlib
import importlib
import json
import math
import os
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch

import maskforge
from maskforge import regen
from maskforge.artifact import load_artifact
from maskforge.data import DataSplits, InMemoryImages, load_data
from maskforge.errors import MaskforgeError
from maskforge.layers import batchnorm_modules, masked_modules
from maskforge.search import SearchConfig, search

# `maskforge.search` the attribute is the function; the module (whose globals we patch) is this:
search_module = importlib.import_module("maskforge.search")
VENDORED = Path(maskforge.__file__).parent / "_data" / "mnist5k.npz"


# ---------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture
def captured(monkeypatch):
    """Keep a reference to the (splits, model) that `prepare` builds, i.e. the model the search trains."""
    seen: dict = {}
    original = search_module.prepare

    def spy(config):
        splits, model, args = original(config)
        seen["splits"], seen["model"], seen["config"] = splits, model, config
        seen.setdefault("hooks", [])
        for hook in seen["hooks"]:
            hook(splits, model)
        return splits, model, args

    monkeypatch.setattr(search_module, "prepare", spy)
    return seen


def _subset(monkeypatch, train: int, heldout: int) -> None:
    """Make the demo set smaller (first `train` / `heldout` examples of each split) to keep runs short."""
    original = search_module.load_data

    def small(source, **kwargs):
        splits = original(source, **kwargs)
        return DataSplits(splits.name, splits.kind,
                          InMemoryImages(splits.train.images[:train], splits.train.labels[:train]),
                          InMemoryImages(splits.heldout.images[:heldout], splits.heldout.labels[:heldout]),
                          splits.spec, splits.augment)

    monkeypatch.setattr(search_module, "load_data", small)


def _normalize(images: torch.Tensor, spec) -> torch.Tensor:
    """(x / 255 - mean) / std per channel, written out independently of maskforge.data.normalize."""
    mean = torch.tensor(spec.mean, dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(spec.std, dtype=torch.float32).view(1, -1, 1, 1)
    return (images.float() / 255.0 - mean) / std


def _config(tmp_path: Path, name: str = "run", **overrides) -> SearchConfig:
    values = dict(arch="fc", epochs=1, max_steps=3, batch_size=64, workers=0, device="cpu",
                  out=str(tmp_path / name))
    values.update(overrides)
    return SearchConfig(**values)


# ---------------------------------------------------------------------------------------------------------
# The weights never change
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch,steps,subset", [("fc", 4, None), ("resnet18", 1, (8, 8))])
def test_search_never_changes_a_weight(tmp_path, monkeypatch, captured, arch, steps, subset):
    if subset:
        _subset(monkeypatch, *subset)
    snapshot: dict[str, torch.Tensor] = {}

    def take_snapshot(splits, model):  # the state of the very model the search is about to train
        snapshot.update({n: t.detach().clone() for n, t in model.named_parameters()})
        snapshot.update({n: t.detach().clone() for n, t in model.named_buffers()})

    captured["hooks"] = [take_snapshot]
    config = _config(tmp_path, arch=arch, max_steps=steps, batch_size=8 if subset else 64, seed=7)
    result = search(config, progress=False)
    model = captured["model"]

    for name, layer in masked_modules(model).items():
        shape = tuple(layer.weight.shape)
        # the weights are bit for bit what they were, and what the generator gives (the oracle)
        assert torch.equal(layer.weight.view(torch.int32), snapshot[f"{name}.weight"].view(torch.int32)), name
        fresh = regen.generate(7, f"{name}.weight", shape, "signed_constant")
        assert layer.weight.numpy().tobytes() == fresh.tobytes(), name
        # the scores started from their own seeded stream, and the search moved them
        bound = 1.0 / math.sqrt(math.prod(shape[1:]))
        start = regen.uniform(7, f"{name}.scores", shape, bound)
        assert snapshot[f"{name}.scores"].numpy().tobytes() == start.tobytes(), name
        assert not torch.equal(layer.scores, snapshot[f"{name}.scores"]), name
    assert all(n.endswith("scores") for n, _ in model.named_parameters())
    assert {n for n, _ in model.named_parameters()} == {f"{n}.scores" for n in masked_modules(model)}
    for name, bn in batchnorm_modules(model).items():
        # PyTorch's initial statistics (0 and 1) moved; nothing else a BN holds is trainable
        assert torch.equal(snapshot[f"{name}.running_mean"], torch.zeros(bn.num_features)), name
        assert torch.equal(snapshot[f"{name}.running_var"], torch.ones(bn.num_features)), name
        assert not torch.equal(bn.running_mean, snapshot[f"{name}.running_mean"]), name
        assert not torch.equal(bn.running_var, snapshot[f"{name}.running_var"]), name
        assert bn.num_batches_tracked.item() == steps, name
    assert bool(batchnorm_modules(model)) == (arch == "resnet18")

    # the artifact is that model: masks, statistics and the recorded weight digests
    artifact = load_artifact(result.artifact_path)
    for name, layer in masked_modules(model).items():
        assert torch.equal(artifact.masks[f"{name}.weight"], layer.mask()), name
        digest = hashlib.sha256(snapshot[f"{name}.weight"].numpy().astype("<f4").tobytes()).hexdigest()
        assert artifact.document["digests"]["weights"][f"{name}.weight"] == digest
    for name, bn in batchnorm_modules(model).items():
        assert torch.equal(artifact.bn_stats[f"{name}.running_mean"], bn.running_mean)
        assert torch.equal(artifact.bn_stats[f"{name}.running_var"], bn.running_var)
    if arch == "fc":  # (test_artifact covers the rebuild of a BN network)
        x = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            assert torch.equal(artifact.create_model()(x), model.eval()(x))


# ---------------------------------------------------------------------------------------------------------
# Determinism and outputs
# ---------------------------------------------------------------------------------------------------------


def test_same_config_same_bytes_other_seed_other_bytes(tmp_path, monkeypatch):
    _subset(monkeypatch, 512, 100)
    a = search(_config(tmp_path, "a"), progress=False)
    b = search(_config(tmp_path, "b"), progress=False)
    c = search(_config(tmp_path, "c", seed=1), progress=False)
    bytes_a = a.artifact_path.read_bytes()
    assert bytes_a == b.artifact_path.read_bytes()
    assert bytes_a != c.artifact_path.read_bytes()
    assert load_artifact(c.artifact_path).seed == 1
    # metrics agree too, except the timings
    strip = [{k: v for k, v in m.items() if k not in ("images_per_s", "epoch_seconds")} for m in a.metrics]
    assert strip == [{k: v for k, v in m.items() if k not in ("images_per_s", "epoch_seconds")}
                     for m in b.metrics]


def test_run_folder_contents_and_metrics(tmp_path, monkeypatch):
    _subset(monkeypatch, 256, 200)  # 2 steps of 128 per epoch
    config = _config(tmp_path, epochs=2, max_steps=None, batch_size=128)
    result = search(config, progress=False)
    out = Path(config.out)
    assert (out / "artifact.safetensors").is_file() and result.artifact_path == out / "artifact.safetensors"
    recorded = json.loads((out / "config.json").read_text())
    assert recorded == json.loads(json.dumps(asdict(config)))
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2
    records = [json.loads(line) for line in lines]
    assert records == json.loads(json.dumps(result.metrics))
    for epoch, record in enumerate(records, start=1):
        assert record["epoch"] == epoch and record["step"] == 2 * epoch
        assert 0.0 <= record["heldout_acc"] <= 1.0
        assert record["train_loss"] > 0 and np.isfinite(record["train_loss"])
        assert record["images_per_s"] > 0
    # the held-out accuracy of the last epoch is that of the saved artifact, computed independently
    artifact = load_artifact(result.artifact_path)
    model = artifact.create_model()
    data = np.load(VENDORED)
    images = torch.from_numpy(data["images"][4::5][:200]).unsqueeze(1)
    labels = torch.from_numpy(data["labels"][4::5][:200]).long()
    with torch.no_grad():
        accuracy = (model(_normalize(images, artifact.spec)).argmax(1) == labels).float().mean().item()
    assert abs(accuracy - records[-1]["heldout_acc"]) <= 1 / 200 + 1e-12
    assert artifact.document["provenance"]["heldout_acc"] == records[-1]["heldout_acc"]
    assert artifact.document["provenance"]["steps"] == 4


def test_heldout_images_are_never_trained_on(tmp_path, captured):
    inputs: list[torch.Tensor] = []

    def record(splits, model):
        def hook(module, args):
            if module.training:
                inputs.append(args[0].detach().clone())
        model.register_forward_pre_hook(hook)

    captured["hooks"] = [record]
    config = _config(tmp_path, max_steps=4, batch_size=128)
    search(config, progress=False)
    splits = captured["splits"]

    # the split is the documented one: row i of the vendored file is held out iff i % 5 == 4
    data = np.load(VENDORED)
    held = np.arange(5000) % 5 == 4
    assert np.array_equal(splits.heldout.images.squeeze(1).numpy(), data["images"][held])
    assert np.array_equal(splits.train.images.squeeze(1).numpy(), data["images"][~held])

    def keys(x: torch.Tensor) -> set[bytes]:
        return {row.numpy().tobytes() for row in x.reshape(x.shape[0], -1)}

    trained = torch.cat(inputs)
    assert trained.shape[0] == 4 * 128
    train_keys = keys(_normalize(splits.train.images, splits.spec))
    heldout_keys = keys(_normalize(splits.heldout.images, splits.spec))
    seen = keys(trained)
    assert seen <= train_keys  # the comparison works: everything trained on is a training image
    assert not seen & heldout_keys


# ---------------------------------------------------------------------------------------------------------
# Bad input fails before anything is written
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("change,message", [
    ({"k": 0.0}, "search config: k must be > 0, got 0.0"),
    ({"k": 1.5}, "search config: k must be <= 1, got 1.5"),
    ({"epochs": 0}, "search config: epochs must be >= 1, got 0"),
    ({"init": "xavier"}, "search config: init must be one of 'signed_constant', 'unsigned_constant' or "
                         "'kaiming_normal', got 'xavier'"),
    ({"epochs": 2, "warmup_epochs": 2}, "search config: warmup_epochs (2) must be smaller than epochs (2)"),
    ({"lr": float("inf")}, "search config: lr must be a finite number, got inf"),
])
def test_bad_config_is_refused_when_built(tmp_path, change, message):
    with pytest.raises(MaskforgeError) as caught:
        _config(tmp_path, **change)
    assert str(caught.value) == message


@pytest.mark.parametrize("change,message", [
    ({"data": "MISSING"}, "data source {tmp}/no-such-folder does not exist; expected one of: 'mnist5k'"),
    ({"data": "EMPTY"}, "data source {tmp}/empty is not a recognized data folder; expected one of: 'mnist5k'"),
    ({"arch": "resnet9000"}, "unknown architecture 'resnet9000'; choose from: fc, conv2,"),
])
def test_bad_search_raises_and_writes_nothing(tmp_path, change, message):
    change = dict(change)
    if change.get("data") == "MISSING":
        change["data"] = str(tmp_path / "no-such-folder")
    elif change.get("data") == "EMPTY":
        (tmp_path / "empty").mkdir()
        change["data"] = str(tmp_path / "empty")
    config = _config(tmp_path, **change)
    with pytest.raises(MaskforgeError) as caught:
        search(config, progress=False)
    assert str(caught.value).startswith(message.format(tmp=tmp_path))
    assert not Path(config.out).exists()


def test_out_path_that_is_a_file(tmp_path):
    target = tmp_path / "taken"
    target.write_text("keep me")
    with pytest.raises(MaskforgeError, match="taken"):
        search(_config(tmp_path, "taken"), progress=False)
    assert target.read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


def test_unwritable_out_folder(tmp_path):
    parent = tmp_path / "readonly"
    parent.mkdir()
    parent.chmod(0o500)
    try:
        if os.access(parent, os.W_OK):
            pytest.skip("running with privileges that ignore folder permissions (root)")
        with pytest.raises(MaskforgeError, match="readonly"):
            search(_config(parent, "run"), progress=False)
        assert not (parent / "run").exists()
    finally:
        parent.chmod(0o700)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses /proc, where nobody can create folders")
def test_out_folder_that_cannot_be_created_even_by_root(tmp_path):
    config = _config(tmp_path, out="/proc/maskforge-test-run/run")
    with pytest.raises(MaskforgeError, match="maskforge-test-run"):
        search(config, progress=False)
    assert not Path("/proc/maskforge-test-run").exists()


# ---------------------------------------------------------------------------------------------------------
# Found from outside: any seed the format allows (bug 1), every training image every epoch (bug 5)
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [2 ** 45, 2 ** 63 - 1])
def test_any_seed_the_format_allows_searches_end_to_end(tmp_path, seed):
    from typer.testing import CliRunner

    from maskforge.cli import app

    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["search", "--arch", "fc", "--epochs", "1", "--max-steps", "1",
                                      "--batch-size", "64", "--seed", str(seed), "--device", "cpu",
                                      "--out", str(out), "-q"])
    assert result.exit_code == 0, result.output
    assert load_artifact(out / "artifact.safetensors").seed == seed


@pytest.fixture
def spy_arch():
    """The fc network, registered under a test-only name, recording every input it trains on."""
    from maskforge import archs

    trained: list[torch.Tensor] = []

    def record(module, args):
        if module.training:
            trained.append(args[0].detach().clone())

    def build(in_channels, num_classes, image_size, k=0.5):
        model = archs.ARCHS["fc"].builder(in_channels, num_classes, image_size, k=k)
        model.register_forward_pre_hook(record)
        return model

    archs.register_arch("_spy_fc", "test-only: fc that records its training inputs")(build)
    yield "_spy_fc", trained
    archs.ARCHS.pop("_spy_fc")


def test_every_training_image_is_used_once_per_epoch(tmp_path, spy_arch):
    """4,000 demo training images at batch 128: 31 full batches and a last one of 32, every epoch."""
    arch, trained = spy_arch
    result = search(_config(tmp_path, arch=arch, epochs=2, max_steps=None, batch_size=128), progress=False)
    assert [record["step"] for record in result.metrics] == [32, 64]
    assert [x.shape[0] for x in trained] == ([128] * 31 + [32]) * 2
    splits = load_data("mnist5k")
    train = _normalize(splits.train.images, splits.spec).reshape(4000, -1)
    expected = sorted(row.numpy().tobytes() for row in train)
    for epoch in range(2):
        seen = torch.cat(trained[32 * epoch: 32 * (epoch + 1)]).reshape(-1, 28 * 28)
        assert sorted(row.numpy().tobytes() for row in seen) == expected, f"epoch {epoch}"

"""Tests for maskforge.search through its public behaviour: the weights never change, the result is a pure
function of the config, metrics are what they claim, the held-out split is never trained on, every
training image is used once per epoch, the schedule is the documented one, a search learns, and bad input
fails before anything is written.

What the search does to its network is observed through a spied architecture (tests/helpers.spy_arch,
registered in the public registry); smaller data sets are MNIST folders written from the demo file."""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import demo_rows, spy_arch, without_timings, write_mnist_folder
from maskforge import regen
from maskforge.artifact import load_artifact, pack_mask
from maskforge.errors import MaskforgeError
from maskforge.layers import batchnorm_modules, masked_modules
from maskforge.searches import SearchConfig, search


def _normalize(images: np.ndarray | torch.Tensor, spec) -> torch.Tensor:
    """(x / 255 - mean) / std per channel for [N, H, W] gray images, written out independently of maskforge."""
    x = torch.as_tensor(np.asarray(images)).float().reshape(len(images), 1, 28, 28)
    mean = torch.tensor(spec.mean, dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(spec.std, dtype=torch.float32).view(1, -1, 1, 1)
    return (x / 255.0 - mean) / std


def _rows(x: torch.Tensor) -> list[bytes]:
    return [row.numpy().tobytes() for row in x.reshape(x.shape[0], -1)]


def _config(tmp_path: Path, name: str = "run", **overrides) -> SearchConfig:
    values = dict(arch="fc", epochs=1, max_steps=3, batch_size=64, workers=0, device="cpu", out=str(tmp_path / name))
    values.update(overrides)
    return SearchConfig(**values)


@pytest.fixture(scope="module")
def small_demo(tmp_path_factory) -> str:
    """The first 256 training and 200 held-out demo images, as an MNIST folder."""
    return str(write_mnist_folder(tmp_path_factory.mktemp("small_demo"), 256, 200))


# ---------------------------------------------------------------------------------------------------------
# The weights never change
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch,steps,data", [("fc", 4, None), ("resnet18", 1, (8, 8))])
def test_search_never_changes_a_weight(tmp_path, arch, steps, data):
    source = str(write_mnist_folder(tmp_path / "data", *data)) if data else "mnist5k"
    with spy_arch(arch) as spy:
        config = _config(tmp_path, arch=spy.name, max_steps=steps, batch_size=8 if data else 64, seed=7, data=source)
        result = search(config)
        model, start = spy.models[0], spy.first_state  # the model the search trained, as it started

        for name, layer in masked_modules(model).items():
            shape = tuple(layer.weight.shape)
            # the weights are bit for bit what they were, and what the generator gives (the oracle)
            assert torch.equal(layer.weight.view(torch.int32), start[f"{name}.weight"].view(torch.int32)), name
            fresh = regen.generate(7, f"{name}.weight", shape, "signed_constant")
            assert layer.weight.numpy().tobytes() == fresh.tobytes(), name
            # the scores started from their own seeded stream, and the search moved them
            bound = 1.0 / math.sqrt(math.prod(shape[1:]))
            assert (
                start[f"{name}.scores"].numpy().tobytes() == regen.uniform(7, f"{name}.scores", shape, bound).tobytes()
            ), name
            assert not torch.equal(layer.scores, start[f"{name}.scores"]), name
        assert {n for n, _ in model.named_parameters()} == {f"{n}.scores" for n in masked_modules(model)}
        for name, bn in batchnorm_modules(model).items():
            # PyTorch's initial statistics (0 and 1) moved; nothing else a BN holds is trainable
            assert torch.equal(start[f"{name}.running_mean"], torch.zeros(bn.num_features)), name
            assert torch.equal(start[f"{name}.running_var"], torch.ones(bn.num_features)), name
            assert not torch.equal(bn.running_mean, start[f"{name}.running_mean"]), name
            assert bn.num_batches_tracked.item() == steps, name
        assert bool(batchnorm_modules(model)) == (arch == "resnet18")

        # the artifact is that model: masks, statistics and the recorded weight digests
        artifact = load_artifact(result.artifact_path)
        for name, layer in masked_modules(model).items():
            assert torch.equal(artifact.masks[f"{name}.weight"], layer.mask()), name
            digest = hashlib.sha256(start[f"{name}.weight"].numpy().astype("<f4").tobytes()).hexdigest()
            assert artifact.document["digests"]["weights"][f"{name}.weight"] == digest
        for name, bn in batchnorm_modules(model).items():
            assert torch.equal(artifact.bn_stats[f"{name}.running_mean"], bn.running_mean)
            assert torch.equal(artifact.bn_stats[f"{name}.running_var"], bn.running_var)
        # every rank's mask digest is returned (the torchrun test compares them): layer names + packed masks
        expected = hashlib.sha256()
        for name, layer in masked_modules(model).items():
            expected.update(name.encode() + pack_mask(layer.mask()).tobytes())
        assert result.mask_digest == expected.hexdigest()


# ---------------------------------------------------------------------------------------------------------
# Determinism and outputs
# ---------------------------------------------------------------------------------------------------------


def test_same_config_same_bytes_other_seed_other_bytes(tmp_path, small_demo):
    a = search(_config(tmp_path, "a", data=small_demo))
    b = search(_config(tmp_path, "b", data=small_demo))
    c = search(_config(tmp_path, "c", data=small_demo, seed=1))
    bytes_a = a.artifact_path.read_bytes()
    assert bytes_a == b.artifact_path.read_bytes()
    assert bytes_a != c.artifact_path.read_bytes()
    assert load_artifact(c.artifact_path).seed == 1
    assert without_timings(a.metrics) == without_timings(b.metrics)  # metrics agree too, except the timings


def test_run_folder_contents_and_metrics(tmp_path, small_demo):
    config = _config(tmp_path, data=small_demo, epochs=2, max_steps=None, batch_size=128)  # 2 steps per epoch
    steps, epochs = [], []
    result = search(config, on_step=lambda progress: steps.append(progress.step), on_epoch=epochs.append)
    out = Path(config.out)
    # the checkpoint is removed when the search finishes (keep_checkpoint keeps it)
    assert sorted(p.name for p in out.iterdir()) == [
        "artifact.safetensors",
        "config.json",
        "metrics.csv",
        "metrics.jsonl",
    ]
    assert result.artifact_path == out / "artifact.safetensors"
    assert SearchConfig.from_dict(json.loads((out / "config.json").read_text())) == config
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert records == json.loads(json.dumps(result.metrics)) == json.loads(json.dumps(epochs))
    # metrics.csv: the same records as a table, every field of a record a column (floats round-trip exactly)
    with open(out / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [{key: float(value) for key, value in row.items()} for row in rows] == [
        {key: float(value) for key, value in record.items()} for record in records
    ]
    assert steps == [1, 2, 3, 4] and [r["step"] for r in records] == [2, 4] and [r["epoch"] for r in records] == [1, 2]
    for record in records:
        assert record["train_loss"] > 0 and np.isfinite(record["train_loss"]) and record["images_per_s"] > 0
    # the held-out loss and accuracy of the last epoch are those of the saved artifact, computed independently
    artifact = load_artifact(result.artifact_path)
    _, _, test_x, test_y = demo_rows()
    with torch.no_grad():
        logits = artifact.create_model()(_normalize(test_x[:200], artifact.spec))
    labels = torch.from_numpy(test_y[:200]).long()
    assert abs((logits.argmax(1) == labels).float().mean().item() - records[-1]["heldout_acc"]) <= 1 / 200 + 1e-12
    assert math.isclose(
        torch.nn.functional.cross_entropy(logits, labels).item(), records[-1]["heldout_loss"], rel_tol=1e-5
    )
    provenance = artifact.document["provenance"]
    assert (provenance["heldout_acc"], provenance["steps"], provenance["heldout_examples"]) == (
        records[-1]["heldout_acc"],
        4,
        200,
    )
    assert (provenance["device"], provenance["precision"], provenance["channels_last"]) == ("cpu", "fp32", False)


def test_heldout_images_are_never_trained_on(tmp_path):
    with spy_arch("fc") as spy:
        spec = search(_config(tmp_path, arch=spy.name, max_steps=4, batch_size=128)).artifact.spec
    train_x, _, test_x, _ = demo_rows()
    seen = set(_rows(torch.cat(spy.trained)))
    assert sum(x.shape[0] for x in spy.trained) == 4 * 128
    assert seen <= set(_rows(_normalize(train_x, spec)))  # the comparison works: all trained are train images
    assert not seen & set(_rows(_normalize(test_x, spec)))


def test_every_training_image_is_used_once_per_epoch(tmp_path):
    """Found from outside (bug 5): 4,000 demo training images at batch 128 are 31 full batches and a last
    one of 32, every epoch; none is skipped."""
    with spy_arch("fc") as spy:
        result = search(_config(tmp_path, arch=spy.name, epochs=2, max_steps=None, batch_size=128))
    assert [record["step"] for record in result.metrics] == [32, 64]
    assert [x.shape[0] for x in spy.trained] == ([128] * 31 + [32]) * 2
    expected = sorted(_rows(_normalize(demo_rows()[0], result.artifact.spec)))
    for epoch in range(2):
        assert sorted(_rows(torch.cat(spy.trained[32 * epoch : 32 * (epoch + 1)]))) == expected, f"epoch {epoch}"


@pytest.mark.parametrize("seed", [2**45, 2**63 - 1])
def test_any_seed_the_format_allows_searches_end_to_end(tmp_path, seed):
    """Found from outside (bug 1): a seed above ~2^44 used to overflow the data order's generator."""
    from typer.testing import CliRunner

    from maskforge.cli import app

    out = tmp_path / "run"
    result = CliRunner().invoke(
        app,
        [
            "search",
            "--arch",
            "fc",
            "--epochs",
            "1",
            "--max-steps",
            "1",
            "--batch-size",
            "64",
            "--seed",
            str(seed),
            "--device",
            "cpu",
            "--out",
            str(out),
            "-q",
        ],
    )
    assert result.exit_code == 0, result.output
    assert load_artifact(out / "artifact.safetensors").seed == seed


# ---------------------------------------------------------------------------------------------------------
# The schedule, and a search that learns
# ---------------------------------------------------------------------------------------------------------


def test_warmup_then_cosine_schedule(tmp_path, small_demo):
    """The learning rate of every step against the formula of docs/SCALE.md, written out here: step s of
    S (w warm-up steps) uses lr * (s + 1) / w while s < w, then lr / 2 * (1 + cos(pi * (s - w) / (S - w)))."""
    lrs = []
    search(
        _config(tmp_path, data=small_demo, epochs=4, warmup_epochs=1, max_steps=None, batch_size=100, lr=0.2),
        on_step=lambda progress: lrs.append(progress.lr),
    )
    total, warmup = 4 * 3, 3  # 256 images at batch 100: 3 steps per epoch
    expected = [
        0.2 * (s + 1) / warmup if s < warmup else 0.1 * (1 + np.cos(np.pi * (s - warmup) / (total - warmup)))
        for s in range(total)
    ]
    assert np.allclose(lrs, expected, rtol=1e-12, atol=0)


def test_a_short_search_learns(tmp_path):
    """fc on the demo set for 40 steps: held-out accuracy far above chance (10 %), measured independently."""
    result = search(_config(tmp_path, k=0.5, max_steps=40, batch_size=100, lr=0.1))
    artifact = load_artifact(result.artifact_path)
    _, _, test_x, test_y = demo_rows()
    with torch.no_grad():
        predictions = artifact.create_model()(_normalize(test_x, artifact.spec)).argmax(1).numpy()
    accuracy = float((predictions == test_y).mean())
    assert accuracy > 0.6, accuracy
    assert accuracy == result.heldout_acc


# ---------------------------------------------------------------------------------------------------------
# Bad input fails before anything is written
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change,message",
    [
        ({"k": 0.0}, "search config: k must be > 0, got 0.0"),
        ({"k": 1.5}, "search config: k must be <= 1, got 1.5"),
        ({"epochs": 0}, "search config: epochs must be >= 1, got 0"),
        (
            {"init": "xavier"},
            "search config: init must be one of 'signed_constant', 'unsigned_constant' or "
            "'kaiming_normal', got 'xavier'",
        ),
        ({"epochs": 2, "warmup_epochs": 2}, "search config: warmup_epochs (2) must be smaller than epochs (2)"),
        ({"lr": float("inf")}, "search config: lr must be a finite number, got inf"),
    ],
)
def test_bad_config_is_refused_when_built(tmp_path, change, message):
    with pytest.raises(MaskforgeError) as caught:
        _config(tmp_path, **change)
    assert str(caught.value) == message


@pytest.mark.parametrize(
    "change,message",
    [
        ({"data": "MISSING"}, "data source {tmp}/no-such-folder does not exist; expected one of: 'mnist5k'"),
        ({"data": "EMPTY"}, "data source {tmp}/empty is not a recognized data folder; expected one of: 'mnist5k'"),
        (
            {"arch": "resnet9000"},
            "unknown architecture 'resnet9000' (did you mean 'resnet50'?); choose from: fc, conv2,",
        ),
    ],
)
def test_bad_search_raises_and_writes_nothing(tmp_path, change, message):
    change = dict(change)
    if change.get("data") == "MISSING":
        change["data"] = str(tmp_path / "no-such-folder")
    elif change.get("data") == "EMPTY":
        (tmp_path / "empty").mkdir()
        change["data"] = str(tmp_path / "empty")
    config = _config(tmp_path, **change)
    with pytest.raises(MaskforgeError) as caught:
        search(config)
    assert str(caught.value).startswith(message.format(tmp=tmp_path))
    assert not Path(config.out).exists()


def test_out_path_that_is_a_file(tmp_path):
    target = tmp_path / "taken"
    target.write_text("keep me")
    with pytest.raises(MaskforgeError) as caught:
        search(_config(tmp_path, "taken"))
    assert str(caught.value) == f"output path {target} exists and is not a folder"
    assert target.read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


def test_unwritable_out_folder(tmp_path):
    parent = tmp_path / "readonly"
    parent.mkdir()
    parent.chmod(0o500)
    try:
        if os.access(parent, os.W_OK):
            pytest.skip("running with privileges that ignore folder permissions (root)")
        with pytest.raises(MaskforgeError) as caught:
            search(_config(parent, "run"))
        assert str(caught.value).startswith(f"cannot create output folder {parent / 'run'}: ")
        assert not (parent / "run").exists()
    finally:
        parent.chmod(0o700)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses /proc, where nobody can create folders")
def test_out_folder_that_cannot_be_created_even_by_root(tmp_path):
    config = _config(tmp_path, out="/proc/maskforge-test-run/run")
    with pytest.raises(MaskforgeError) as caught:
        search(config)
    assert str(caught.value).startswith("cannot create output folder /proc/maskforge-test-run/run: ")
    assert not Path("/proc/maskforge-test-run").exists()


def test_computing_choices_are_applied_and_recorded(tmp_path):
    """precision, channels_last and deterministic reach the loop (seen from on_step, during the search),
    are recorded in the provenance, and the global switches are restored afterwards."""
    data = str(write_mnist_folder(tmp_path / "data", 64, 16))
    seen = []

    def during(progress):
        seen.append((torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic))

    before = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic)
    with spy_arch("conv2") as spy:
        result = search(
            _config(
                tmp_path,
                arch=spy.name,
                data=data,
                max_steps=2,
                batch_size=32,
                precision="bf16",
                channels_last=True,
                deterministic=True,
            ),
            on_step=during,
        )
        inputs = spy.trained
    assert seen == [(True, True)] * 2
    assert (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic) == before
    assert all(x.is_contiguous(memory_format=torch.channels_last) for x in inputs)
    provenance = result.artifact.document["provenance"]
    assert {
        key: provenance[key] for key in ("device", "precision", "channels_last", "masker", "compile", "deterministic")
    } == {
        "device": "cpu",
        "precision": "bf16",
        "channels_last": True,
        "masker": "numpy",
        "compile": False,
        "deterministic": True,
    }

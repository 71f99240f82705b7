"""Tests for maskforge.dense (the dense baseline): the network is the search's architecture with ordinary
trainable layers, training is reproducible, learns, and reports what an independent evaluation finds."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn

from maskforge.archs import arch_args, build_structure
from maskforge.data import load_data, normalize
from maskforge.dense import DenseConfig, dense_model, train_dense
from maskforge.errors import MaskforgeError
from maskforge.layers import masked_modules
from maskforge.searches import SearchConfig


@pytest.mark.parametrize(
    "arch,args", [("conv4", arch_args(3, 5, (16, 12), 0.5)), ("resnet18", arch_args(3, 4, (16, 16)))]
)
def test_dense_model_is_the_search_network_with_every_weight_trainable(arch, args):
    with torch.device("meta"):
        masked = build_structure(arch, args, 0.5)
    dense = dense_model(arch, args, seed=3)
    masked_shapes = [(name, tuple(layer.weight.shape)) for name, layer in masked_modules(masked).items()]
    dense_shapes = [
        (name, tuple(m.weight.shape)) for name, m in dense.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))
    ]
    assert dense_shapes == masked_shapes
    assert all(m.bias is None for m in dense.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    params = dict(dense.named_parameters())
    assert sorted(params) == sorted(f"{name}.weight" for name, _ in masked_shapes)  # BN stays non-affine
    assert all(p.requires_grad and p.std() > 0 for p in params.values())
    if arch == "conv4":  # the seed decides the initialization (one check is enough: the code path is shared)
        again, other = dense_model(arch, args, seed=3), dense_model(arch, args, seed=4)
        for (name, a), b, c in zip(params.items(), again.parameters(), other.parameters()):
            assert torch.equal(a, b) and not torch.equal(a, c), name


def test_dense_training_learns_reproducibly_and_reports_the_true_accuracy(tmp_path):
    config = DenseConfig(
        arch="fc", epochs=1, max_steps=20, batch_size=64, seed=5, device="cpu", out=str(tmp_path / "dense")
    )
    result = train_dense(config)
    splits = load_data("mnist5k")
    images = torch.stack([splits.heldout[i][0] for i in range(len(splits.heldout))])
    labels = torch.tensor([int(splits.heldout[i][1]) for i in range(len(splits.heldout))])
    with torch.no_grad():
        accuracy = float((result.model(normalize(images, splits.spec)).argmax(1) == labels).double().mean())
    assert result.heldout_acc == pytest.approx(accuracy, abs=1e-12)
    assert result.heldout_acc > 0.5 and result.steps == 20 and result.finite  # 10 classes: chance is 0.1
    assert result.weights == 784 * 300 + 300 * 100 + 100 * 10
    written = json.loads((tmp_path / "dense" / "dense.json").read_text())
    assert written["heldout_acc"] == result.heldout_acc and written["steps"] == 20
    assert json.loads((tmp_path / "dense" / "config.json").read_text())["optimizer"] == "adam"
    again = train_dense(DenseConfig(**{**vars(config), "out": None}))
    assert again.heldout_acc == result.heldout_acc and again.final_train_loss == result.final_train_loss


def test_dense_config_of_a_search_shares_its_data_schedule_and_seed():
    search = SearchConfig(
        arch="conv2", k=0.3, width=2.0, epochs=3, batch_size=32, seed=7, lr=0.2, label_smoothing=0.0, out="x"
    )
    dense = DenseConfig.like(search, out="y")
    assert (dense.arch, dense.width, dense.epochs, dense.batch_size, dense.seed, dense.label_smoothing) == (
        "conv2",
        2.0,
        3,
        32,
        7,
        0.0,
    )
    assert (dense.optimizer, dense.lr, dense.weight_decay, dense.out) == ("adam", 1e-3, 0.0, "y")


def test_bad_dense_configs(tmp_path):
    with pytest.raises(MaskforgeError, match="optimizer must be one of adam, sgd"):
        train_dense(DenseConfig(optimizer="lbfgs", out=str(tmp_path / "x")))
    with pytest.raises(MaskforgeError, match="unknown architecture"):
        train_dense(DenseConfig(arch="vgg", out=str(tmp_path / "x")))
    assert not (tmp_path / "x").exists()


def test_the_dense_twin_computes_as_its_search_does():
    """A sweep's device choices reach its dense baseline (they were dropped: a --precision fp32 GPU sweep
    trained its baseline in bf16)."""
    search = SearchConfig(arch="conv2", precision="fp32", channels_last=False, compile=True, deterministic=True)
    twin = DenseConfig.like(search).search_config()
    assert (twin.precision, twin.channels_last, twin.compile, twin.deterministic) == ("fp32", False, True, True)

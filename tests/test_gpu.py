"""The CUDA path of the search: state stays on the device, bf16 autocast, channels_last, torch.compile,
resume from a GPU checkpoint, and torchrun with NCCL. Skipped where no CUDA device is present.

NOTE: written without access to a GPU; these tests have not been run yet (see docs/SCALE.md).
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys

import pytest
import torch

from maskforge.artifact import load_artifact
from maskforge.checkpoint import CHECKPOINT_NAME, load_checkpoint
from maskforge.layers import MaskedConv2d
from maskforge.search import SearchConfig, resume, search

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

search_module = importlib.import_module("maskforge.search")


def _config(tmp_path, name="run", **overrides) -> SearchConfig:
    values = dict(arch="conv2", k=0.5, epochs=1, max_steps=4, batch_size=64, device="cuda", workers=0,
                  out=str(tmp_path / name))
    values.update(overrides)
    return SearchConfig(**values)


@pytest.fixture
def probe(monkeypatch):
    """Record, from inside the search, where its tensors live and in which dtype/layout the convs run."""
    seen: dict = {"calls": 0}
    original = search_module.prepare

    def spy(config):
        splits, model, args = original(config)
        seen["model"] = model
        conv = next(m for m in model.modules() if isinstance(m, MaskedConv2d))

        def hook(module, inputs, output):
            if module.training:
                seen["calls"] += 1
                seen["input_channels_last"] = inputs[0].is_contiguous(memory_format=torch.channels_last)
                seen["output_dtype"] = output.dtype
                seen["devices"] = {module.scores.device.type, module.weight.device.type}
                seen["mask_device"] = module.mask().device.type

        conv.register_forward_hook(hook)
        return splits, model, args

    monkeypatch.setattr(search_module, "prepare", spy)
    return seen


def test_search_runs_on_the_gpu_in_bf16_channels_last(tmp_path, probe):
    result = search(_config(tmp_path), progress=False)
    assert probe["calls"] == 4
    assert probe["devices"] == {"cuda"} and probe["mask_device"] == "cuda"
    assert probe["output_dtype"] == torch.bfloat16
    assert probe["input_channels_last"]
    artifact = load_artifact(result.artifact_path)
    assert artifact.masked_weights > 0 and 0.0 <= result.heldout_acc <= 1.0
    assert result.metrics[-1]["images_per_s"] > 0


def test_gpu_accuracy_matches_cpu(tmp_path):
    gpu = search(_config(tmp_path, "gpu", arch="fc", max_steps=20, batch_size=128), progress=False)
    cpu = search(_config(tmp_path, "cpu", arch="fc", max_steps=20, batch_size=128, device="cpu"), progress=False)
    assert abs(gpu.heldout_acc - cpu.heldout_acc) <= 0.05  # bf16 vs float32: close, not equal


def test_gpu_checkpoint_resumes(tmp_path, monkeypatch):
    original = search_module.lr_at

    def crash(step, *args):
        if step == 3:
            raise KeyboardInterrupt
        return original(step, *args)

    monkeypatch.setattr(search_module, "lr_at", crash)
    config = _config(tmp_path, checkpoint_every=2)
    with pytest.raises(KeyboardInterrupt):
        search(config, progress=False)
    monkeypatch.setattr(search_module, "lr_at", original)
    assert load_checkpoint(tmp_path / "run" / CHECKPOINT_NAME).position["step"] == 2
    result = resume(tmp_path / "run", progress=False)
    assert result.metrics[-1]["step"] == 4
    load_artifact(result.artifact_path)


def test_compile_on_gpu(tmp_path):
    result = search(_config(tmp_path, compile=True, max_steps=3), progress=False)
    assert result.metrics[-1]["step"] == 3
    load_artifact(result.artifact_path)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_torchrun_two_gpus_nccl(tmp_path):
    out = tmp_path / "ddp"
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
            "-m", "maskforge.cli", "search", "--arch", "conv2", "--max-steps", "6", "--epochs", "1",
            "--batch-size", "128", "--device", "cuda", "-q", "--out", str(out)]
    env = {**os.environ}
    env.pop("WORLD_SIZE", None)
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    artifact = load_artifact(out / "artifact.safetensors")
    assert artifact.document["provenance"]["processes"] == 2

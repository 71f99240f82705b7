"""The CUDA path of the search: the maskers on the device against the CPU sort oracle, bf16 autocast
steps, channels_last, torch.compile, state staying on the device, resume from a GPU checkpoint, and
torchrun with NCCL. Skipped where no CUDA device is present (`benchmarks/gpu_check.sh` runs them).

NOTE: written without access to a GPU; these tests have not been run yet (see docs/GPU_CHECK.md).
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys

import pytest
import torch

import torch.nn as nn
import torch.nn.functional as F

from maskforge.artifact import load_artifact
from maskforge.checkpoint import CHECKPOINT_NAME, load_checkpoint
from maskforge.layers import (
    MaskedConv2d,
    MaskedLinear,
    NonAffineBatchNorm2d,
    masked_modules,
    set_masker,
    set_topk,
    topk_mask,
)
from maskforge.searches import SearchConfig, resume, search
from maskforge.topk import MASKERS, global_topk_masks
from test_global_topk import global_oracle
from test_layers import sort_oracle, sort_order
from test_maskers import _values

# cuBLAS is deterministic (the deterministic search below) only with a fixed workspace, read when the
# process creates its first cuBLAS handle: set it at collection, before any test runs.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

search_module = importlib.import_module("maskforge.searches")


# --- the maskers on the device ---------------------------------------------------------------------------


def _oracle_masks(values: torch.Tensor, kepts: list[int]) -> dict[int, torch.Tensor]:
    """The sort oracle's masks for several kept counts from one sort (on the CPU)."""
    order = sort_order(values)
    masks = {}
    for kept in kepts:
        mask = torch.zeros(values.numel(), dtype=torch.bool)
        mask[torch.from_numpy(order[:kept])] = True
        masks[kept] = mask
    return masks


@pytest.mark.parametrize("masker", MASKERS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["distinct", "ties", "signed_zeros", "nan_inf", "mostly_nan"])
def test_masker_on_cuda_matches_the_cpu_oracle(masker, dtype, kind):
    """The torch masker on the GPU (topk threshold, prefix count) and the numpy one (host round trip)."""
    big = kind in ("ties", "nan_inf") and dtype == torch.float32
    sizes = (1, 7, 1000, 40_000) + ((3_000_000,) if big else ())
    for n in sizes:
        values = _values(kind, n, dtype, seed=n)
        kepts = sorted({1, 2, n // 3, n // 2, (3 * n) // 4, n - 1, n} - {0})
        for kept, expected in _oracle_masks(values, kepts).items():
            got = topk_mask(values.cuda(), kept, masker=masker)
            assert got.is_cuda and got.dtype == torch.bool
            assert torch.equal(got.cpu().reshape(-1), expected), (n, kept)


@pytest.mark.parametrize("masker", MASKERS)
def test_global_topk_on_cuda_matches_the_oracle(masker):
    gen = torch.Generator().manual_seed(3)
    shapes = [(64, 3, 3, 3), (500, 300), (10,)]
    scores = [torch.randint(-3, 4, shape, generator=gen).float() for shape in shapes]
    scores[1][7, :4] = float("nan")  # argmax and topk on the GPU must rank NaN highest, ties by index
    scores[2][3] = scores[2][8] = float("nan")
    for k in (0.0005, 0.3, 0.9):
        masks = global_topk_masks([s.cuda() for s in scores], k, masker=masker)
        for got, want in zip(masks, global_oracle(scores, k)):
            assert got.is_cuda and torch.equal(got.cpu(), want), k


def _tiny_net(k: float = 0.4) -> nn.Module:
    model = nn.Sequential(
        MaskedConv2d(3, 16, 3, padding=1, k=k),
        NonAffineBatchNorm2d(16),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        MaskedLinear(64, 10, k=k),
    )
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for layer in masked_modules(model).values():
            layer.weight.copy_(torch.randn(layer.weight.shape, generator=gen) * 0.3)
            layer.scores.copy_(torch.randint(-5, 6, layer.scores.shape, generator=gen).float() * 0.01)
    return model


def _train_steps(
    model: nn.Module, device: str, *, bf16: bool, channels_last: bool, steps: int = 3, compiled: bool = False
) -> list[torch.Tensor]:
    """SGD steps on a fixed batch; returns the logits of each step (float32, on the CPU)."""
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    run = torch.compile(model) if compiled else model
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(16, 3, 8, 8, generator=gen).to(device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (16,), generator=gen).to(device)
    outputs = []
    for _ in range(steps):
        with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
            logits = run(x)
            loss = F.cross_entropy(logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        outputs.append(logits.detach().float().cpu())
    return outputs


@pytest.mark.parametrize("masker", MASKERS)
def test_bf16_channels_last_steps_on_cuda_keep_exact_masks(masker):
    """bf16 autocast + channels_last on the GPU: every mask is the CPU oracle's for the scores the GPU
    holds (bf16 changes the activations, never the selection), and the logits stay close to fp32's."""
    model = _tiny_net()
    set_masker(model, masker)
    bf16 = _train_steps(model, "cuda", bf16=True, channels_last=True)
    for layer in masked_modules(model).values():
        assert layer.scores.device.type == "cuda" and layer.mask().is_cuda
        assert torch.equal(layer.mask().cpu(), sort_oracle(layer.scores.detach().abs().cpu(), layer.kept))
    fp32 = _train_steps(_tiny_net(), "cuda", bf16=False, channels_last=False, steps=1)
    torch.testing.assert_close(bf16[0], fp32[0], rtol=0.05, atol=0.05)


@pytest.fixture
def deterministic_cuda():
    """cuDNN without autotuning, TF32 or non-deterministic kernels, restored afterwards: two identical
    networks then compute identical bits, so their masks cannot drift apart through tied scores."""
    saved = (
        torch.backends.cudnn.deterministic,
        torch.backends.cudnn.benchmark,
        torch.backends.cudnn.allow_tf32,
        torch.backends.cuda.matmul.allow_tf32,
    )
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    (
        torch.backends.cudnn.deterministic,
        torch.backends.cudnn.benchmark,
        torch.backends.cudnn.allow_tf32,
        torch.backends.cuda.matmul.allow_tf32,
    ) = saved


def test_both_maskers_agree_on_cuda_in_fp32(deterministic_cuda):
    runs = {}
    for masker in MASKERS:
        model = _tiny_net()
        set_masker(model, masker)
        runs[masker] = (_train_steps(model, "cuda", bf16=False, channels_last=True), model)
    for a, b in zip(runs["numpy"][0], runs["torch"][0]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for a, b in zip(masked_modules(runs["numpy"][1]).values(), masked_modules(runs["torch"][1]).values()):
        assert torch.equal(a.mask(), b.mask())
        assert torch.equal(a.mask().cpu(), sort_oracle(a.scores.detach().abs().cpu(), a.kept))


def test_compiled_bf16_steps_on_cuda_match_eager():
    eager = _train_steps(_tiny_net(), "cuda", bf16=True, channels_last=True)
    compiled_model = _tiny_net()
    compiled = _train_steps(compiled_model, "cuda", bf16=True, channels_last=True, compiled=True)
    # the first step starts from the same scores; later ones may drift in the last bf16 bits
    torch.testing.assert_close(compiled[0], eager[0], rtol=0.02, atol=0.02)
    assert all(torch.isfinite(out).all() for out in compiled)
    for layer in masked_modules(compiled_model).values():
        assert torch.equal(layer.mask().cpu(), sort_oracle(layer.scores.detach().abs().cpu(), layer.kept))


def test_global_topk_trains_on_cuda():
    model = _tiny_net(0.3)
    set_topk(model, "global")
    outputs = _train_steps(model, "cuda", bf16=True, channels_last=True, steps=2)
    assert all(torch.isfinite(o).all() for o in outputs)
    layers = list(masked_modules(model).values())
    expected = global_oracle([layer.scores.detach().cpu() for layer in layers], 0.3)
    for layer, want in zip(layers, expected):
        assert torch.equal(layer.mask().cpu(), want)


def _config(tmp_path, name="run", **overrides) -> SearchConfig:
    values = dict(
        arch="conv2", k=0.5, epochs=1, max_steps=4, batch_size=64, device="cuda", workers=0, out=str(tmp_path / name)
    )
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
    result = search(_config(tmp_path))
    assert probe["calls"] == 4
    assert probe["devices"] == {"cuda"} and probe["mask_device"] == "cuda"
    assert probe["output_dtype"] == torch.bfloat16
    assert probe["input_channels_last"]
    artifact = load_artifact(result.artifact_path)
    assert artifact.masked_weights > 0 and 0.0 <= result.heldout_acc <= 1.0
    assert result.metrics[-1]["images_per_s"] > 0


def test_gpu_accuracy_matches_cpu(tmp_path):
    gpu = search(_config(tmp_path, "gpu", arch="fc", max_steps=20, batch_size=128))
    cpu = search(_config(tmp_path, "cpu", arch="fc", max_steps=20, batch_size=128, device="cpu"))
    assert abs(gpu.heldout_acc - cpu.heldout_acc) <= 0.05  # bf16 vs float32: close, not equal


class _Crash(Exception):
    pass


def test_gpu_checkpoint_resumes(tmp_path):
    """Killed after step 3 (through the public on_step callback), resumed from the checkpoint of step 2."""

    def crash(progress):
        if progress.step == 3:
            raise _Crash()

    config = _config(tmp_path, checkpoint_every=2)
    with pytest.raises(_Crash):
        search(config, on_step=crash)
    assert load_checkpoint(tmp_path / "run" / CHECKPOINT_NAME).position["step"] == 2
    result = resume(tmp_path / "run")
    assert result.metrics[-1]["step"] == 4
    load_artifact(result.artifact_path)


def test_deterministic_search_on_gpu_repeats_bit_for_bit(tmp_path):
    """With deterministic (and fp32, eager, one process) two GPU searches write the same masks and
    batch-norm statistics; a kernel without a deterministic implementation would be a one-line error."""
    runs = [
        search(
            _config(tmp_path, f"det{i}", arch="resnet18", precision="fp32", deterministic=True, max_steps=3)
        ).artifact
        for i in range(2)
    ]
    assert runs[0].masks.keys() == runs[1].masks.keys()
    assert all(torch.equal(runs[0].masks[name], runs[1].masks[name]) for name in runs[0].masks)
    assert all(torch.equal(runs[0].bn_stats[name], runs[1].bn_stats[name]) for name in runs[0].bn_stats)
    assert runs[0].document["provenance"]["deterministic"] is True


def test_global_topk_search_on_gpu_writes_a_global_artifact(tmp_path):
    result = search(_config(tmp_path, topk="global", k=0.3))
    artifact = load_artifact(result.artifact_path)
    assert artifact.topk == "global"
    sizes = [mask.numel() for mask in artifact.masks.values()]
    assert artifact.kept_weights == max(len(sizes), round(0.3 * sum(sizes)))


def test_compile_on_gpu(tmp_path):
    result = search(_config(tmp_path, compile=True, max_steps=3))
    assert result.metrics[-1]["step"] == 3
    load_artifact(result.artifact_path)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_torchrun_two_gpus_nccl(tmp_path):
    out = tmp_path / "ddp"
    argv = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "maskforge.cli",
        "search",
        "--arch",
        "conv2",
        "--max-steps",
        "6",
        "--epochs",
        "1",
        "--batch-size",
        "128",
        "--device",
        "cuda",
        "-q",
        "--out",
        str(out),
    ]
    env = {**os.environ}
    env.pop("WORLD_SIZE", None)
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    artifact = load_artifact(out / "artifact.safetensors")
    assert artifact.document["provenance"]["processes"] == 2


VIT_ARGS = '{"image_size": 28, "patch_size": 4, "num_layers": 2, "num_heads": 4, "hidden_dim": 64, "mlp_dim": 128}'


@pytest.mark.parametrize(
    "arch,arch_args", [("torchvision:mobilenet_v3_small", None), ("torchvision:VisionTransformer", VIT_ARGS)]
)
@pytest.mark.parametrize("compile_model", [False, True])
def test_converted_models_search_on_the_gpu(tmp_path, arch, arch_args, compile_model):
    """Issue 15's CUDA leg: converted models (depthwise convolutions, attention) on the fast recipe (bf16,
    channels_last for the convolutions, the device's masker) with and without torch.compile, then the
    artifact verifies and exports with parity (the export runs on the CPU: the weights are the seed's)."""
    from maskforge.export import export_onnx
    from maskforge.verify import verify_artifact

    result = search(
        _config(tmp_path, arch=arch, arch_args=arch_args, max_steps=20, compile=compile_model, batch_size=128)
    )
    assert result.metrics[-1]["step"] == 20 and result.heldout_acc > 0.1
    assert result.artifact.document["provenance"]["device"].startswith("cuda")
    assert verify_artifact(result.artifact_path).ok
    exported = export_onnx(result.artifact_path, tmp_path / "model.onnx")
    assert exported.max_abs_diff <= exported.parity_tolerance

#!/usr/bin/env python
"""Cost of one edge-popup search step against one dense training step of the same network and batch.

For each workload this times, in one process and interleaved (so all variants see the same machine load):

* `search`    — the maskforge model from `archs.create_model` (masked layers, SGD on the scores);
* `dense`     — the same architecture with every masked layer swapped for a plain `nn.Conv2d`/`nn.Linear`
                whose weight is trained (non-affine batch norm kept), i.e. ordinary training;
* `reference` — the same masked network, but masked the way the paper's reference code does it
                (`GetSubnet`: `scores.abs().flatten().sort()`, zero the bottom, one the top, straight-through
                backward), i.e. a full sort per layer per step.

Each sample is a block of `--inner` consecutive steps of one variant, after warm-up steps; the variant order
rotates from one repetition to the next; the figure is the median over `--repeats` samples. Peak memory is
measured per variant in a fresh subprocess (CPU: peak RSS during the steps above the RSS right after the
imports, via /proc/self/clear_refs; CUDA: `torch.cuda.max_memory_allocated`).

    python benchmarks/search_step.py                          # all CPU workloads, a table
    python benchmarks/search_step.py --arch fc --arch conv4 --json
    python benchmarks/search_step.py --device cuda            # bf16 autocast, channels-last, as `search` does
    python benchmarks/search_step.py --device cuda --compile --variants search,dense --no-memory
    python benchmarks/search_step.py --precision bf16 --channels-last --masker torch   # the GPU recipe on the CPU
    python benchmarks/search_step.py --device cuda --epoch-like   # images/s of a real search on JPEG files

Timings on a shared machine are noisy: read `load_before`/`load_after` in the JSON and rerun on a quiet one.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from maskforge import archs, convert
from maskforge.layers import MaskedConv2d, MaskedLinear, masked_modules, set_masker
from maskforge.searches.device import bf16_supported, uses_conv

K = 0.5
SEED = 0
VARIANTS = ("search", "dense", "reference")
BREAKDOWN = ("fixed-mask", "fixed-all")  # --variants ...,fixed-mask,fixed-all: where the extra time goes


@dataclass(frozen=True)
class Recipe:
    """How a step runs; the defaults follow the device as `maskforge search` does (None: follow it)."""

    precision: str | None = None  # fp32 | bf16 (autocast); default bf16 on CUDA, fp32 on the CPU
    channels_last: bool | None = None  # default: on CUDA
    masker: str | None = None  # numpy | torch | None (the layers' default for the device)
    compile_backend: str | None = None  # torch.compile backend ("inductor"); None: eager

    def resolved(self, device: torch.device, model: nn.Module) -> "Recipe":
        """The defaults `maskforge search` takes (searches/device.py: bf16 where the GPU has it, channels_last
        for conv nets on CUDA)."""
        cuda = device.type == "cuda"
        return Recipe(
            self.precision or ("bf16" if cuda and bf16_supported(device) else "fp32"),
            (cuda if self.channels_last is None else self.channels_last) and uses_conv(model),
            self.masker,
            self.compile_backend,
        )


@dataclass(frozen=True)
class Workload:
    arch: str
    channels: int
    size: int
    classes: int
    batch_cpu: int
    batch_cuda: int
    repeats: int  # default samples on CPU (CUDA steps are cheap: 4x as many)
    inner: int  # steps per timed sample on CPU (fc steps take about a millisecond)
    builder_args: dict | None = None  # a builder reference's keyword arguments (maskforge.convert)
    key: str | None = None  # the --arch name of a builder reference's workload

    @property
    def name(self) -> str:
        return self.key or self.arch


WORKLOADS = {
    "conv4": Workload("conv4", 3, 32, 10, 128, 128, repeats=10, inner=1),
    "fc": Workload("fc", 1, 28, 10, 128, 128, repeats=30, inner=20),
    "resnet18": Workload("resnet18", 3, 32, 10, 128, 128, repeats=6, inner=1),
    "wrn50": Workload("wrn50", 3, 224, 1000, 8, 256, repeats=3, inner=1),
    # any-model conversion (maskforge.convert): depthwise convs + squeeze-excitation, and attention
    "mobilenet_v3_small": Workload(
        "torchvision:mobilenet_v3_small", 3, 32, 10, 128, 128, repeats=10, inner=1, key="mobilenet_v3_small"
    ),
    "vit_small": Workload(
        "torchvision:VisionTransformer",
        3,
        32,
        10,
        128,
        128,
        repeats=10,
        inner=2,
        builder_args={
            "image_size": 32,
            "patch_size": 4,
            "num_layers": 2,
            "num_heads": 4,
            "hidden_dim": 64,
            "mlp_dim": 128,
        },
        key="vit_small",
    ),
}


# --- the paper's reference masker (Algorithm 1 / hidden-networks `GetSubnet`) -----------------------------


class GetSubnet(torch.autograd.Function):
    """A full sort of the scores per call; the bottom entries become 0, the top `kept` 1; identity backward.

    The reference code keeps `numel - int((1 - k) * numel)` weights; here the count is maskforge's
    `kept_count` so both maskers keep exactly as many weights.
    """

    @staticmethod
    def forward(ctx, scores: torch.Tensor, kept: int) -> torch.Tensor:
        out = scores.clone()
        _, idx = scores.flatten().sort()
        j = scores.numel() - kept
        flat_out = out.flatten()
        flat_out[idx[:j]] = 0
        flat_out[idx[j:]] = 1
        return out

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        return g, None


class _ReferenceMixin:
    def _adopt(self, layer) -> None:
        self.register_buffer("weight_fixed", layer.weight.detach().clone(), persistent=False)
        self.scores = nn.Parameter(layer.scores.detach().clone())
        self.kept = layer.kept

    def subnet_weight(self) -> torch.Tensor:
        # as in the reference: w = weight * GetSubnet(|scores|); autograd's abs gives the sign(s) factor
        return self.weight_fixed * GetSubnet.apply(self.scores.abs(), self.kept)

    effective_weight = subnet_weight  # what a converted attention (layers.ProjectedAttention) asks for


class ReferenceConv2d(_ReferenceMixin, nn.Module):
    def __init__(self, layer: MaskedConv2d) -> None:
        super().__init__()
        self.stride, self.padding, self.dilation, self.groups = (
            layer.stride,
            layer.padding,
            layer.dilation,
            layer.groups,
        )
        self._adopt(layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.subnet_weight(), None, self.stride, self.padding, self.dilation, self.groups)


class ReferenceLinear(_ReferenceMixin, nn.Module):
    def __init__(self, layer: MaskedLinear) -> None:
        super().__init__()
        self._adopt(layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.subnet_weight())


def _dense_twin(name: str, layer) -> torch.Tensor:
    """The weight of the plain trainable layer that replaces a masked one: its current effective weight
    (so the outputs match)."""
    with torch.no_grad():
        return (layer.weight * layer.mask()).clone()


def _swap_masked(model: nn.Module, make) -> nn.Module:
    for name, layer in list(masked_modules(model).items()):
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, make(layer))
    return model


class _FixedProduct(torch.autograd.Function):
    """Breakdown: the straight-through product without any selection (a fixed weight * mask), and with
    `gradient` also without the backward's arithmetic (a fixed score gradient)."""

    @staticmethod
    def forward(ctx, scores, weight, product, gradient):
        ctx.save_for_backward(scores, weight)
        ctx.gradient = gradient
        return product

    @staticmethod
    def backward(ctx, grad):
        if ctx.gradient is not None:
            return ctx.gradient, None, None, None
        scores, weight = ctx.saved_tensors
        return torch.sign(scores).mul_(weight).mul_(grad), None, None, None


def _fix_selection(model: nn.Module, fixed_gradient: bool) -> nn.Module:
    for layer in masked_modules(model).values():
        cache: dict = {}

        def effective_weight(layer=layer, cache=cache):
            device = layer.weight.device
            if device not in cache:  # built once per device, on the first step
                with torch.no_grad():
                    cache[device] = (
                        layer.weight * layer.mask(),
                        torch.zeros_like(layer.scores) if fixed_gradient else None,
                    )
            return _FixedProduct.apply(layer.scores, layer.weight, *cache[device])

        layer.effective_weight = effective_weight
    return model


def build_variant(workload: Workload, variant: str, masker: str | None = None) -> nn.Module:
    model = archs.create_model(
        workload.arch,
        in_channels=workload.channels,
        num_classes=workload.classes,
        image_size=(workload.size, workload.size),
        k=K,
        seed=SEED,
        builder_args=workload.builder_args,
    )
    set_masker(model, masker)
    if variant in BREAKDOWN:
        return _fix_selection(model, fixed_gradient=variant == "fixed-all")
    if variant == "dense":
        return convert.plain_layers(model, weight_of=_dense_twin)
    if variant == "reference":
        return _swap_masked(
            model, lambda layer: ReferenceConv2d(layer) if isinstance(layer, MaskedConv2d) else ReferenceLinear(layer)
        )
    return model


# --- one training step ------------------------------------------------------------------------------------


def make_step(model: nn.Module, workload: Workload, batch: int, device: torch.device, recipe: Recipe = Recipe()):
    """A closure running forward + loss + backward + SGD step on a fixed random batch."""
    recipe = recipe.resolved(device, model)
    model.to(device).train()
    if recipe.channels_last:
        model.to(memory_format=torch.channels_last)
    params = [p for p in model.parameters() if p.requires_grad]
    # The search's optimizer settings; the step costs the same whatever the learning rate.
    optimizer = torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=1e-4)
    forward = torch.compile(model, backend=recipe.compile_backend) if recipe.compile_backend else model
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(batch, workload.channels, workload.size, workload.size, generator=gen).to(device)
    if recipe.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, workload.classes, (batch,), generator=gen).to(device)
    bf16 = recipe.precision == "bf16"

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = forward(x)
            loss = F.cross_entropy(logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(
    steps: dict, device: torch.device, repeats: int, inner: int, warmup: int, clock=time.perf_counter
) -> dict:
    """Median seconds per step of each variant; variants alternate, in a rotating order."""
    names = list(steps)
    for name in names:
        for _ in range(warmup):
            steps[name]()
    _sync(device)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            _sync(device)
            started = clock()
            for _ in range(inner):
                steps[name]()
            _sync(device)
            samples[name].append((clock() - started) / inner)
    return {
        name: {"median_s": statistics.median(v), "min_s": min(v), "samples": len(v), "values": v}
        for name, v in samples.items()
    }


# --- peak memory, one fresh process per variant -----------------------------------------------------------


def _rss_mb(field: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def measure_memory_child(workload: Workload, variant: str, batch: int, device: torch.device, recipe: Recipe) -> dict:
    """Runs in a subprocess: build one variant, run steps, report its peak memory."""
    base_rss = _rss_mb("VmRSS")
    model = build_variant(workload, variant, recipe.masker)
    step = make_step(model, workload, batch, device, recipe)
    if device.type == "cuda":
        step()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        for _ in range(2):
            step()
        torch.cuda.synchronize()
        return {"peak_mb": torch.cuda.max_memory_allocated() / 2**20, "method": "cuda.max_memory_allocated"}
    try:  # reset the RSS high-water mark, so the model's construction peak does not count
        Path("/proc/self/clear_refs").write_text("5")
        method = "VmHWM after clear_refs, minus RSS after imports"
    except OSError:
        method = "ru_maxrss (includes model construction), minus RSS after imports"
    for _ in range(3):
        step()
    peak = _rss_mb("VmHWM")
    if peak is None or "ru_maxrss" in method:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"peak_mb": peak - (base_rss or 0.0), "peak_rss_mb": peak, "base_rss_mb": base_rss, "method": method}


def measure_memory(variants: list[str], child_args: list[str], parallel: bool) -> dict:
    """{variant: peak report}, each variant in a fresh process (CPU: run side by side, as RSS is per
    process; CUDA: one after the other, so that they never share the GPU's memory). `child_args`: this
    script's arguments that define the workload (arch, device, batch, image size, recipe, threads)."""

    def start(variant: str) -> subprocess.Popen:
        command = [sys.executable, __file__, *child_args, "--_memory-child", variant]
        return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def finish(proc: subprocess.Popen) -> dict:
        out, err = proc.communicate()
        if proc.returncode != 0:
            return {"peak_mb": None, "error": (err.strip().splitlines() or ["failed"])[-1]}
        return json.loads(out.strip().splitlines()[-1])

    if parallel:
        procs = {variant: start(variant) for variant in variants}
        return {variant: finish(proc) for variant, proc in procs.items()}
    return {variant: finish(start(variant)) for variant in variants}


# --- a workload ------------------------------------------------------------------------------------------


def _fit_batch(workload: Workload, models: dict, device: torch.device, batch: int, recipe: Recipe):
    """On CUDA: halve the batch until one step of every variant fits; returns (batch, steps)."""
    while True:
        try:
            steps = {name: make_step(model, workload, batch, device, recipe) for name, model in models.items()}
            for step in steps.values():
                step()
            _sync(device)
            return batch, steps
        except torch.cuda.OutOfMemoryError:
            steps = None
            for model in models.values():
                for p in model.parameters():
                    p.grad = None
            torch.cuda.empty_cache()
            if batch == 1:
                raise
            batch //= 2


def _check_same_network(models: dict, workload: Workload, device: torch.device) -> dict[str, float]:
    """Largest |logit difference| from the search model at initialization, per other variant.

    Dense must be exactly the search network. The reference may differ slightly: where several scores
    equal the threshold, its (unstable) sort keeps other tied weights than maskforge's lowest-index rule.
    """
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(4, workload.channels, workload.size, workload.size, generator=gen).to(device)
    outs = {}
    with torch.no_grad():
        for name, model in models.items():
            model.to(device).eval()
            outs[name] = model(x).float().cpu()
            model.train()
    return {name: float((out - outs["search"]).abs().max()) for name, out in outs.items() if name != "search"}


def run_workload(
    workload: Workload,
    device: torch.device,
    *,
    repeats: int | None,
    inner: int | None,
    batch: int | None,
    memory: bool,
    threads: int | None,
    clock: str = "wall",
    warmup: int | None = None,
    recipe: Recipe = Recipe(),
    variants: tuple[str, ...] = VARIANTS,
    child_args: list[str] | None = None,
) -> dict:
    cuda = device.type == "cuda"
    batch = batch or (workload.batch_cuda if cuda else workload.batch_cpu)
    repeats = repeats or (workload.repeats * 4 if cuda else workload.repeats)
    inner = inner or (max(1, workload.inner // 2) if cuda else workload.inner)
    models = {name: build_variant(workload, name, recipe.masker) for name in variants}
    recipe = recipe.resolved(device, next(iter(models.values())))
    logit_diff = (
        _check_same_network(models, workload, device) if workload.arch != "wrn50" and "search" in models else {}
    )
    if cuda:
        torch.backends.cudnn.benchmark = True
    batch, steps = _fit_batch(workload, models, device, batch, recipe)
    load_before = os.getloadavg()[0]
    if warmup is None:
        warmup = 2 if workload.inner == 1 else 5
    times = time_interleaved(
        steps,
        device,
        repeats=repeats,
        inner=inner,
        warmup=warmup,
        clock=time.process_time if clock == "cpu" else time.perf_counter,
    )
    load_after = os.getloadavg()[0]
    del steps, models
    if cuda:
        torch.cuda.empty_cache()
    child = [*(child_args or []), "--arch", workload.name, "--batch", str(batch)]
    peaks = measure_memory(list(variants), child, parallel=not cuda) if memory else {}
    ms = {name: times[name]["median_s"] * 1e3 if name in times else None for name in VARIANTS + BREAKDOWN}
    peak = {name: peaks.get(name, {}).get("peak_mb") for name in VARIANTS}

    def ratio(a, b):
        return None if a is None or b is None or not b else a / b

    return {
        "arch": workload.name,
        "batch": batch,
        "device": device.type,
        "input": [workload.channels, workload.size, workload.size],
        "variants": list(variants),
        "search_ms": ms["search"],
        "dense_ms": ms["dense"],
        "reference_ms": ms["reference"],
        "ratio": ratio(ms["search"], ms["dense"]),
        "reference_ratio": ratio(ms["reference"], ms["search"]),
        # the median over repetitions of (search / dense) within one repetition: the two samples of a pair
        # ran back to back, so a load change on a shared machine cancels out better than in medians' ratio
        "paired_ratio": (
            statistics.median(a / b for a, b in zip(times["search"]["values"], times["dense"]["values"]))
            if "search" in times and "dense" in times
            else None
        ),
        "reference_vs_dense": ratio(ms["reference"], ms["dense"]),
        **{f"{name.replace('-', '_')}_ms": ms[name] for name in BREAKDOWN if name in variants},
        **{f"{name}_min_ms": times[name]["min_s"] * 1e3 if name in times else None for name in VARIANTS},
        "search_peak_mb": peak["search"],
        "dense_peak_mb": peak["dense"],
        "reference_peak_mb": peak["reference"],
        "peak_ratio": ratio(peak["search"], peak["dense"]),
        "memory_method": next((p.get("method") for p in peaks.values() if p.get("method")), None),
        "memory_errors": {name: p["error"] for name, p in peaks.items() if p.get("error")} or None,
        "repeats": repeats,
        "inner": inner,
        "clock": clock,
        "k": K,
        "precision": recipe.precision,
        "amp": "bf16" if recipe.precision == "bf16" else None,
        "channels_last": recipe.channels_last,
        "masker": recipe.masker or ("torch" if cuda or recipe.compile_backend else "numpy"),
        "compile": recipe.compile_backend,
        "init_logit_max_diff": logit_diff.get("dense"),
        "reference_logit_max_diff": logit_diff.get("reference"),
        "load_before": load_before,
        "load_after": load_after,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
        "machine": platform.processor() or platform.machine(),
        "gpu": torch.cuda.get_device_name(device) if cuda else None,
    }


# --- epoch-like mode: a real search over image files ------------------------------------------------------


def write_image_folder(root: Path, *, classes: int, per_class: int, size: int, heldout: int) -> Path:
    """A small image folder (train/<class>/*.jpg, val/<class>/*.png) of random-ish pictures."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, count, ext in (("train", per_class, "jpg"), ("val", heldout, "png")):
        for c in range(classes):
            folder = root / split / f"class{c:02d}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                base = rng.integers(0, 256, (1, 1, 3), dtype=np.uint8)
                noise = rng.integers(0, 64, (size, size, 3), dtype=np.uint8)
                Image.fromarray((base + noise).astype(np.uint8)).save(folder / f"{i:04d}.{ext}")
    return root


def run_epoch_like(
    arch: str, device: str, *, image_size: int, images: int, batch: int, workers: int, epochs: int
) -> dict:
    from maskforge import SearchConfig, search

    classes = 10
    with tempfile.TemporaryDirectory(prefix="maskforge-epochlike-") as tmp:
        root = write_image_folder(
            Path(tmp) / "data", classes=classes, per_class=max(1, images // classes), size=image_size, heldout=2
        )
        started = time.perf_counter()
        result = search(
            SearchConfig(
                arch=arch,
                k=K,
                data=str(root),
                epochs=epochs,
                batch_size=batch,
                device=device,
                workers=workers,
                image_size=image_size,
                out=str(Path(tmp) / "run"),
            )
        )
        wall = time.perf_counter() - started
    last = result.metrics[-1]
    return {
        "mode": "epoch-like",
        "arch": arch,
        "device": device,
        "batch": batch,
        "image_size": image_size,
        "train_images": classes * max(1, images // classes),
        "workers": workers,
        "epochs": epochs,
        "images_per_s_last_epoch": last["images_per_s"],
        "images_per_s_by_epoch": [m["images_per_s"] for m in result.metrics],
        "wall_s": wall,
    }


# --- command line -----------------------------------------------------------------------------------------


def _print_table(records: list[dict]) -> None:
    header = (
        f"{'arch':9s} {'dev':4s} {'batch':>5s} {'search ms':>10s} {'dense ms':>10s} {'ratio':>6s} "
        f"{'paired':>6s} {'ref ms':>10s} {'ref/search':>10s} {'search MB':>10s} {'dense MB':>9s} {'ref MB':>8s} "
        f"{'load':>5s}"
    )
    print(header)

    def num(value, digits: int, width: int) -> str:
        return f"{'-':>{width}s}" if value is None else f"{value:{width}.{digits}f}"

    for r in records:
        print(
            f"{r['arch']:9s} {r['device']:4s} {r['batch']:5d} {num(r['search_ms'], 2, 10)} "
            f"{num(r['dense_ms'], 2, 10)} {num(r['ratio'], 3, 6)} {num(r.get('paired_ratio'), 3, 6)} "
            f"{num(r['reference_ms'], 2, 10)} "
            f"{num(r['reference_ratio'], 2, 10)} {num(r['search_peak_mb'], 0, 10)} "
            f"{num(r['dense_peak_mb'], 0, 9)} {num(r['reference_peak_mb'], 0, 8)} {r['load_before']:5.1f}"
        )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--arch", action="append", choices=list(WORKLOADS), help="workload (repeatable); default: all")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    parser.add_argument("--repeats", type=int, help="timed samples per variant (default: per workload)")
    parser.add_argument("--inner", type=int, help="steps per timed sample (default: per workload)")
    parser.add_argument("--warmup", type=int, help="untimed steps per variant first (default: 2, fc 5)")
    parser.add_argument("--batch", type=int, help="override the workload's batch size")
    parser.add_argument("--image-size", type=int, help="override the workload's image side (px)")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="wall: elapsed time (default); cpu: this process's CPU time (CPU device only: "
        "with --threads 1 it ignores time lost to other processes on a loaded machine)",
    )
    parser.add_argument(
        "--variants",
        default=",".join(VARIANTS),
        help=f"comma list of variants to time (default: {','.join(VARIANTS)}; needs dense); "
        "add fixed-mask (no selection, no product) and fixed-all (also no backward "
        "arithmetic) to see where the search's extra time goes",
    )
    parser.add_argument(
        "--precision", choices=("fp32", "bf16"), help="bf16: autocast (default on CUDA); fp32 (default on the CPU)"
    )
    parser.add_argument(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="channels_last activations and weights (default: on CUDA)",
    )
    parser.add_argument("--masker", choices=("numpy", "torch"), help="the search's masker (default: by device)")
    parser.add_argument("--compile", action="store_true", help="torch.compile every timed model")
    parser.add_argument(
        "--compile-backend",
        default="inductor",
        help="torch.compile backend with --compile (default inductor; aot_eager needs no compiler)",
    )
    parser.add_argument("--no-memory", action="store_true", help="skip the per-variant memory subprocesses")
    parser.add_argument(
        "--epoch-like",
        action="store_true",
        help="CUDA only: images/s of a real search over a small JPEG/PNG image folder",
    )
    parser.add_argument("--epoch-images", type=int, default=2560, help="epoch-like: training images")
    parser.add_argument("--epoch-image-size", type=int, default=224, help="epoch-like: image side")
    parser.add_argument("--epoch-workers", type=int, default=8, help="epoch-like: data-loader processes")
    parser.add_argument("--epoch-batch", type=int, default=128, help="epoch-like: batch size")
    parser.add_argument("--epochs", type=int, default=2, help="epoch-like: epochs (the first one warms up)")
    parser.add_argument("--_memory-child", dest="memory_child", choices=VARIANTS + BREAKDOWN, help=argparse.SUPPRESS)
    parser.add_argument("--_epoch-like-on-cpu", dest="epoch_like_cpu", action="store_true", help=argparse.SUPPRESS)
    return parser


def _recipe_args(args) -> list[str]:
    """The arguments a memory subprocess needs to rebuild the same workload and recipe."""
    out = ["--device", args.device]
    for flag, value in (
        ("--precision", args.precision),
        ("--masker", args.masker),
        ("--image-size", args.image_size),
        ("--threads", args.threads),
    ):
        if value is not None:
            out += [flag, str(value)]
    if args.channels_last is not None:
        out.append("--channels-last" if args.channels_last else "--no-channels-last")
    if args.compile:
        out += ["--compile", "--compile-backend", args.compile_backend]
    return out


def _run_epoch_like(args) -> int:
    if args.device != "cuda" and not args.epoch_like_cpu:
        print(
            "--epoch-like measures a GPU search with data loading: run it with --device cuda (skipped on CPU).",
            file=sys.stderr,
        )
        return 0
    for arch in args.arch or ["resnet18"]:
        record = run_epoch_like(
            arch,
            args.device,
            image_size=args.epoch_image_size,
            images=args.epoch_images,
            batch=args.epoch_batch,
            workers=args.epoch_workers,
            epochs=args.epochs,
        )
        print(
            json.dumps(record)
            if args.json
            else f"{arch}: {record['images_per_s_last_epoch']:.0f} images/s (last epoch; by epoch "
            f"{', '.join(f'{v:.0f}' for v in record['images_per_s_by_epoch'])}), "
            f"batch {record['batch']}, {record['image_size']} px, {record['workers']} workers",
            flush=True,
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("CUDA is not available on this machine: GPU figures cannot be measured here (skipped).", file=sys.stderr)
        return 0
    if args.clock == "cpu" and args.device == "cuda":
        parser.error("--clock cpu measures host CPU time: use it with --device cpu")
    variants = tuple(v for v in VARIANTS + BREAKDOWN if v in args.variants.split(","))
    if "dense" not in variants or set(args.variants.split(",")) - set(VARIANTS + BREAKDOWN):
        parser.error(f"--variants: a comma list of {', '.join(VARIANTS + BREAKDOWN)} that includes dense")
    device = torch.device(args.device)
    recipe = Recipe(args.precision, args.channels_last, args.masker, args.compile_backend if args.compile else None)
    arch_list = args.arch or list(WORKLOADS)

    def workload(arch: str) -> Workload:
        chosen = WORKLOADS[arch]
        return replace(chosen, size=args.image_size) if args.image_size else chosen

    if args.memory_child:
        print(json.dumps(measure_memory_child(workload(arch_list[0]), args.memory_child, args.batch, device, recipe)))
        return 0
    if args.epoch_like:
        return _run_epoch_like(args)

    records = []
    for arch in arch_list:
        record = run_workload(
            workload(arch),
            device,
            repeats=args.repeats,
            inner=args.inner,
            batch=args.batch,
            memory=not args.no_memory,
            threads=args.threads,
            clock=args.clock,
            warmup=args.warmup,
            recipe=recipe,
            variants=variants,
            child_args=_recipe_args(args),
        )
        records.append(record)
        if args.json:
            print(json.dumps(record), flush=True)
    if not args.json:
        _print_table(records)
    return 0


if __name__ == "__main__":
    sys.exit(main())

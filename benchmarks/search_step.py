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
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from maskforge import archs
from maskforge.layers import MaskedConv2d, MaskedLinear, masked_modules

K = 0.5
SEED = 0
VARIANTS = ("search", "dense", "reference")


@dataclass(frozen=True)
class Workload:
    arch: str
    channels: int
    size: int
    classes: int
    batch_cpu: int
    batch_cuda: int
    repeats: int  # default samples on CPU (CUDA steps are cheap: 4x as many)
    inner: int    # steps per timed sample on CPU (fc steps take about a millisecond)


WORKLOADS = {
    "conv4": Workload("conv4", 3, 32, 10, 128, 128, repeats=10, inner=1),
    "fc": Workload("fc", 1, 28, 10, 128, 128, repeats=30, inner=20),
    "resnet18": Workload("resnet18", 3, 32, 10, 128, 128, repeats=6, inner=1),
    "wrn50": Workload("wrn50", 3, 224, 1000, 8, 256, repeats=3, inner=1),
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


class ReferenceConv2d(_ReferenceMixin, nn.Module):
    def __init__(self, layer: MaskedConv2d) -> None:
        super().__init__()
        self.stride, self.padding, self.dilation, self.groups = (layer.stride, layer.padding, layer.dilation,
                                                                 layer.groups)
        self._adopt(layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.subnet_weight(), None, self.stride, self.padding, self.dilation, self.groups)


class ReferenceLinear(_ReferenceMixin, nn.Module):
    def __init__(self, layer: MaskedLinear) -> None:
        super().__init__()
        self._adopt(layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.subnet_weight())


def _dense_twin(layer) -> nn.Module:
    """A plain trainable layer holding the masked layer's current effective weight (so outputs match)."""
    with torch.no_grad():
        weight = (layer.weight * layer.mask()).clone()
    if isinstance(layer, MaskedConv2d):
        plain: nn.Module = nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride,
                                     layer.padding, layer.dilation, layer.groups, bias=False, device="meta")
    else:
        plain = nn.Linear(layer.in_features, layer.out_features, bias=False, device="meta")
    plain.weight = nn.Parameter(weight)
    return plain


def _swap_masked(model: nn.Module, make) -> nn.Module:
    for name, layer in list(masked_modules(model).items()):
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, make(layer))
    return model


def build_variant(workload: Workload, variant: str) -> nn.Module:
    model = archs.create_model(workload.arch, in_channels=workload.channels, num_classes=workload.classes,
                               image_size=(workload.size, workload.size), k=K, seed=SEED)
    if variant == "dense":
        return _swap_masked(model, _dense_twin)
    if variant == "reference":
        return _swap_masked(model, lambda layer: ReferenceConv2d(layer) if isinstance(layer, MaskedConv2d)
                            else ReferenceLinear(layer))
    return model


# --- one training step ------------------------------------------------------------------------------------

def make_step(model: nn.Module, workload: Workload, batch: int, device: torch.device):
    """A closure running forward + loss + backward + SGD step on a fixed random batch."""
    cuda = device.type == "cuda"
    model.to(device).train()
    if cuda:
        model.to(memory_format=torch.channels_last)
    params = [p for p in model.parameters() if p.requires_grad]
    # The search's optimizer settings; the step costs the same whatever the learning rate.
    optimizer = torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(batch, workload.channels, workload.size, workload.size, generator=gen).to(device)
    if cuda:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, workload.classes, (batch,), generator=gen).to(device)

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
            logits = model(x)
            loss = F.cross_entropy(logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(steps: dict, device: torch.device, repeats: int, inner: int, warmup: int,
                     clock=time.perf_counter) -> dict:
    """Median seconds per step of each variant; variants alternate, in a rotating order."""
    names = list(steps)
    for name in names:
        for _ in range(warmup):
            steps[name]()
    _sync(device)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            _sync(device)
            started = clock()
            for _ in range(inner):
                steps[name]()
            _sync(device)
            samples[name].append((clock() - started) / inner)
    return {name: {"median_s": statistics.median(v), "min_s": min(v), "samples": len(v)}
            for name, v in samples.items()}


# --- peak memory, one fresh process per variant -----------------------------------------------------------

def _rss_mb(field: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def measure_memory_child(workload: Workload, variant: str, batch: int, device: torch.device) -> dict:
    """Runs in a subprocess: build one variant, run steps, report its peak memory."""
    base_rss = _rss_mb("VmRSS")
    model = build_variant(workload, variant)
    step = make_step(model, workload, batch, device)
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


def measure_memory(arch: str, batch: int, device: str, threads: int | None, parallel: bool) -> dict:
    """{variant: peak report}, each variant in a fresh process (CPU: run side by side, as RSS is per
    process; CUDA: one after the other, so that they never share the GPU's memory)."""

    def start(variant: str) -> subprocess.Popen:
        command = [sys.executable, __file__, "--arch", arch, "--device", device, "--batch", str(batch),
                   "--_memory-child", variant]
        if threads:
            command += ["--threads", str(threads)]
        return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def finish(proc: subprocess.Popen) -> dict:
        out, err = proc.communicate()
        if proc.returncode != 0:
            return {"peak_mb": None, "error": (err.strip().splitlines() or ["failed"])[-1]}
        return json.loads(out.strip().splitlines()[-1])

    if parallel:
        procs = {variant: start(variant) for variant in VARIANTS}
        return {variant: finish(proc) for variant, proc in procs.items()}
    return {variant: finish(start(variant)) for variant in VARIANTS}


# --- a workload ------------------------------------------------------------------------------------------

def _fit_batch(workload: Workload, models: dict, device: torch.device, batch: int):
    """On CUDA: halve the batch until one step of every variant fits; returns (batch, steps)."""
    while True:
        try:
            steps = {name: make_step(model, workload, batch, device) for name, model in models.items()}
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


def _check_same_network(models: dict, workload: Workload) -> dict[str, float]:
    """Largest |logit difference| from the search model at initialization, per other variant.

    Dense must be exactly the search network. The reference may differ slightly: where several scores
    equal the threshold, its (unstable) sort keeps other tied weights than maskforge's lowest-index rule.
    """
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(4, workload.channels, workload.size, workload.size, generator=gen)
    outs = {}
    with torch.no_grad():
        for name, model in models.items():
            model.eval()
            outs[name] = model(x).float()
            model.train()
    return {name: float((out - outs["search"]).abs().max()) for name, out in outs.items() if name != "search"}


def run_workload(workload: Workload, device: torch.device, *, repeats: int | None, inner: int | None,
                 batch: int | None, memory: bool, threads: int | None, clock: str = "wall",
                 warmup: int | None = None) -> dict:
    cuda = device.type == "cuda"
    batch = batch or (workload.batch_cuda if cuda else workload.batch_cpu)
    repeats = repeats or (workload.repeats * 4 if cuda else workload.repeats)
    inner = inner or (max(1, workload.inner // 2) if cuda else workload.inner)
    models = {name: build_variant(workload, name) for name in VARIANTS}
    logit_diff = _check_same_network(models, workload) if workload.arch != "wrn50" else {}
    if cuda:
        torch.backends.cudnn.benchmark = True
    batch, steps = _fit_batch(workload, models, device, batch)
    load_before = os.getloadavg()[0]
    if warmup is None:
        warmup = 2 if workload.inner == 1 else 5
    times = time_interleaved(steps, device, repeats=repeats, inner=inner, warmup=warmup,
                             clock=time.process_time if clock == "cpu" else time.perf_counter)
    load_after = os.getloadavg()[0]
    del steps, models
    if cuda:
        torch.cuda.empty_cache()
    peaks = (measure_memory(workload.arch, batch, device.type, threads, parallel=not cuda) if memory
             else {name: {} for name in VARIANTS})
    ms = {name: times[name]["median_s"] * 1e3 for name in VARIANTS}
    record = {
        "arch": workload.arch, "batch": batch, "device": device.type,
        "input": [workload.channels, workload.size, workload.size],
        "search_ms": ms["search"], "dense_ms": ms["dense"], "reference_ms": ms["reference"],
        "ratio": ms["search"] / ms["dense"], "reference_ratio": ms["reference"] / ms["search"],
        "reference_vs_dense": ms["reference"] / ms["dense"],
        "search_min_ms": times["search"]["min_s"] * 1e3, "dense_min_ms": times["dense"]["min_s"] * 1e3,
        "reference_min_ms": times["reference"]["min_s"] * 1e3,
        "search_peak_mb": peaks["search"].get("peak_mb"), "dense_peak_mb": peaks["dense"].get("peak_mb"),
        "reference_peak_mb": peaks["reference"].get("peak_mb"),
        "memory_method": peaks["search"].get("method"),
        "repeats": repeats, "inner": inner, "clock": clock, "k": K, "amp": "bf16" if cuda else None,
        "init_logit_max_diff": logit_diff.get("dense"), "reference_logit_max_diff": logit_diff.get("reference"),
        "load_before": load_before, "load_after": load_after,
        "threads": torch.get_num_threads(), "torch": torch.__version__, "cpus": os.cpu_count(),
        "machine": platform.processor() or platform.machine(),
        "gpu": torch.cuda.get_device_name(device) if cuda else None,
    }
    return record


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


def run_epoch_like(arch: str, device: str, *, image_size: int, images: int, batch: int, workers: int,
                   epochs: int) -> dict:
    from maskforge import SearchConfig, search

    classes = 10
    with tempfile.TemporaryDirectory(prefix="maskforge-epochlike-") as tmp:
        root = write_image_folder(Path(tmp) / "data", classes=classes, per_class=max(1, images // classes),
                                  size=image_size, heldout=2)
        started = time.perf_counter()
        result = search(SearchConfig(arch=arch, k=K, data=str(root), epochs=epochs, batch_size=batch,
                                     device=device, workers=workers, image_size=image_size,
                                     out=str(Path(tmp) / "run")), progress=False)
        wall = time.perf_counter() - started
    last = result.metrics[-1]
    return {"mode": "epoch-like", "arch": arch, "device": device, "batch": batch, "image_size": image_size,
            "train_images": classes * max(1, images // classes), "workers": workers, "epochs": epochs,
            "images_per_s_last_epoch": last["images_per_s"],
            "images_per_s_by_epoch": [m["images_per_s"] for m in result.metrics], "wall_s": wall}


# --- command line -----------------------------------------------------------------------------------------

def _print_table(records: list[dict]) -> None:
    header = (f"{'arch':9s} {'dev':4s} {'batch':>5s} {'search ms':>10s} {'dense ms':>10s} {'ratio':>6s} "
              f"{'ref ms':>10s} {'ref/search':>10s} {'search MB':>10s} {'dense MB':>9s} {'ref MB':>8s} {'load':>5s}")
    print(header)

    def mb(value) -> str:
        return "-" if value is None else f"{value:.0f}"

    for r in records:
        print(f"{r['arch']:9s} {r['device']:4s} {r['batch']:5d} {r['search_ms']:10.2f} {r['dense_ms']:10.2f} "
              f"{r['ratio']:6.3f} {r['reference_ms']:10.2f} {r['reference_ratio']:10.2f} "
              f"{mb(r['search_peak_mb']):>10s} {mb(r['dense_peak_mb']):>9s} {mb(r['reference_peak_mb']):>8s} "
              f"{r['load_before']:5.1f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", action="append", choices=list(WORKLOADS),
                        help="workload (repeatable); default: all")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    parser.add_argument("--repeats", type=int, help="timed samples per variant (default: per workload)")
    parser.add_argument("--inner", type=int, help="steps per timed sample (default: per workload)")
    parser.add_argument("--warmup", type=int, help="untimed steps per variant first (default: 2, fc 5)")
    parser.add_argument("--batch", type=int, help="override the workload's batch size")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="wall: elapsed time (default); cpu: this process's CPU time (CPU device only: "
                             "with --threads 1 it ignores time lost to other processes on a loaded machine)")
    parser.add_argument("--no-memory", action="store_true", help="skip the per-variant memory subprocesses")
    parser.add_argument("--epoch-like", action="store_true",
                        help="CUDA only: images/s of a real search over a small JPEG/PNG image folder")
    parser.add_argument("--epoch-images", type=int, default=2560, help="epoch-like: training images")
    parser.add_argument("--epoch-image-size", type=int, default=224, help="epoch-like: image side")
    parser.add_argument("--epoch-workers", type=int, default=8, help="epoch-like: data-loader processes")
    parser.add_argument("--epoch-batch", type=int, default=128, help="epoch-like: batch size")
    parser.add_argument("--epochs", type=int, default=2, help="epoch-like: epochs (the first one warms up)")
    parser.add_argument("--_memory-child", dest="memory_child", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--_epoch-like-on-cpu", dest="epoch_like_cpu", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("CUDA is not available on this machine: GPU figures cannot be measured here (skipped).",
              file=sys.stderr)
        return 0
    if args.clock == "cpu" and args.device == "cuda":
        parser.error("--clock cpu measures host CPU time: use it with --device cpu")
    device = torch.device(args.device)
    arch_list = args.arch or list(WORKLOADS)

    if args.memory_child:
        workload = WORKLOADS[arch_list[0]]
        print(json.dumps(measure_memory_child(workload, args.memory_child, args.batch, device)))
        return 0

    if args.epoch_like:
        if args.device != "cuda" and not args.epoch_like_cpu:
            print("--epoch-like measures a GPU search with data loading: run it with --device cuda "
                  "(skipped on CPU).", file=sys.stderr)
            return 0
        for arch in args.arch or ["resnet18"]:
            record = run_epoch_like(arch, args.device, image_size=args.epoch_image_size,
                                    images=args.epoch_images, batch=args.epoch_batch,
                                    workers=args.epoch_workers, epochs=args.epochs)
            print(json.dumps(record) if args.json else
                  f"{arch}: {record['images_per_s_last_epoch']:.0f} images/s (last epoch; by epoch "
                  f"{', '.join(f'{v:.0f}' for v in record['images_per_s_by_epoch'])}), "
                  f"batch {record['batch']}, {record['image_size']} px, {record['workers']} workers")
        return 0

    records = []
    for arch in arch_list:
        record = run_workload(WORKLOADS[arch], device, repeats=args.repeats, inner=args.inner,
                              batch=args.batch, memory=not args.no_memory, threads=args.threads,
                              clock=args.clock, warmup=args.warmup)
        records.append(record)
        if args.json:
            print(json.dumps(record), flush=True)
    if not args.json:
        _print_table(records)
    return 0


if __name__ == "__main__":
    sys.exit(main())

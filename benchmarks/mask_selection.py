#!/usr/bin/env python
"""The per-layer top-k mask on the CPU: the selection methods that were considered, timed side by side.

Each method must give exactly the mask of a stable sort by (-|s|, flat index); every one is checked
against that oracle (with many ties) before it is timed. Timing follows a search: between two calls the
scores take a small SGD-like step, so a method that reuses the previous threshold sees realistic drift.
Methods alternate in a rotating order and the figure is the median (microseconds per call).

    python benchmarks/mask_selection.py                      # fc, conv4 and resnet18 layer sizes
    python benchmarks/mask_selection.py --sizes 235200 2359296 --json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np
import torch

from maskforge.topk import BAND_MIN_SIZE
from maskforge.layers import ThresholdHint, topk_mask

# The largest layers (and the small fc ones): fc 784-300-100-10, conv4 at 32x32, resnet18 at 32x32.
DEFAULT_SIZES = {
    1000: "fc.4",
    30000: "fc.2",
    235200: "fc.1",
    147456: "conv4 conv",
    2097152: "conv4 fc",
    2359296: "resnet18 layer4",
}


def oracle(values: torch.Tensor, kept: int) -> torch.Tensor:
    flat = values.reshape(-1).double().numpy()
    order = np.lexsort((np.arange(flat.size), -flat))
    mask = np.zeros(flat.size, dtype=bool)
    mask[order[:kept]] = True
    return torch.from_numpy(mask)


def _fix_ties(flat: torch.Tensor, threshold, kept: int) -> torch.Tensor:
    mask = flat >= threshold
    excess = int(mask.sum()) - kept
    if excess > 0:
        tied = torch.nonzero(flat == threshold).squeeze(1)
        mask[tied[-excess:]] = False
    return mask


def kthvalue(a: torch.Tensor, kept: int, state: dict) -> torch.Tensor:
    """The previous implementation: torch.kthvalue, a comparison, a tie pass."""
    flat = a.reshape(-1)
    return _fix_ties(flat, torch.kthvalue(flat, flat.numel() - kept + 1).values, kept)


def topk(a: torch.Tensor, kept: int, state: dict) -> torch.Tensor:
    flat = a.reshape(-1)
    return _fix_ties(flat, torch.topk(flat, kept, sorted=False).values.min(), kept)


def sort(a: torch.Tensor, kept: int, state: dict) -> torch.Tensor:
    """The reference code's way (a full sort); its own tie order is not the stable one, so fixed here."""
    flat = a.reshape(-1)
    values = flat.sort().values
    return _fix_ties(flat, values[flat.numel() - kept], kept)


def torch_masker(a: torch.Tensor, kept: int, state: dict) -> torch.Tensor:
    """maskforge's torch masker (the CUDA path): kthvalue and a prefix count, no host sync."""
    return topk_mask(a, kept, masker="torch")


def np_partition(a: torch.Tensor, kept: int, state: dict) -> torch.Tensor:
    """NumPy introselect over the whole layer (maskforge's numpy masker without a hint)."""
    return topk_mask(a, kept, masker="numpy")


def np_partition_band(a: torch.Tensor, kept: int, state: dict) -> torch.Tensor:
    """maskforge's CPU path: the previous threshold's band first, a full partition when it misses."""
    return topk_mask(a, kept, state.setdefault("hint", ThresholdHint()), masker="numpy")


METHODS = {
    "kthvalue": kthvalue,
    "topk": topk,
    "sort": sort,
    "torch_masker": torch_masker,
    "np_partition": np_partition,
    "np_partition_band": np_partition_band,
}


def check_exact() -> int:
    gen = torch.Generator().manual_seed(0)
    checked = 0
    for n in (7, 1000, 40000):
        for levels in (3, 1000, None):
            values = (
                torch.rand(n, generator=gen)
                if levels is None
                else torch.randint(0, levels, (n,), generator=gen).float()
            )
            for kept in (1, n // 3, n // 2, n - 1):
                expected = oracle(values, kept)
                for name, method in METHODS.items():
                    state: dict = {}
                    for _ in range(2):  # the second call uses the hint
                        got = method(values, kept, state).reshape(-1)
                        if not torch.equal(got, expected):
                            raise SystemExit(f"{name} is not exact (n={n}, levels={levels}, kept={kept})")
                        checked += 1
    return checked


def time_size(n: int, calls: int, methods: list[str]) -> dict[str, float]:
    gen = torch.Generator().manual_seed(n)
    scores = (torch.rand(n, generator=gen) * 2 - 1) / np.sqrt(max(1, n // 300))
    step = scores.abs().mean() * 2e-3  # a search step moves scores by a small fraction of their size
    kept = n // 2
    states: dict[str, dict] = {name: {} for name in methods}
    samples: dict[str, list[float]] = {name: [] for name in methods}
    for call in range(calls + 3):
        scores.add_(torch.randn(n, generator=gen) * step)
        magnitudes = scores.abs()
        order = methods[call % len(methods) :] + methods[: call % len(methods)]
        for name in order:
            started = time.perf_counter()
            METHODS[name](magnitudes, kept, states[name])
            if call >= 3:
                samples[name].append(time.perf_counter() - started)
    return {name: statistics.median(v) * 1e6 for name, v in samples.items()}


def time_straight_through(n: int, calls: int) -> dict[str, float]:
    """Forward w * mask and backward grad * w * sign(s): the previous and the current formulations."""
    gen = torch.Generator().manual_seed(1)
    w, s, g = (torch.randn(n, generator=gen) for _ in range(3))
    mask = topk_mask(s.abs(), n // 2)
    w_np, mask_np = w.numpy(), mask.numpy()
    variants = {
        "fwd torch w*mask": lambda: w * mask,
        "fwd numpy multiply": lambda: torch.from_numpy(np.multiply(w_np, mask_np)),
        "bwd grad*(w*sign(s))": lambda: g * (w * torch.sign(s)),
        "bwd sign(s).mul_(w).mul_(grad)": lambda: torch.sign(s).mul_(w).mul_(g),
    }
    return {name: seconds * 1e6 for name, seconds in _rotating_medians(variants, calls, warmup=3).items()}


def _rotating_medians(variants: dict, calls: int, warmup: int, between=None) -> dict[str, float]:
    """Median seconds per call of each variant, called in a rotating order; `between()` runs before
    each round (e.g. a score update), untimed."""
    samples: dict[str, list[float]] = {name: [] for name in variants}
    names = list(variants)
    for call in range(calls + warmup):
        if between is not None:
            between()
        for name in names[call % len(names) :] + names[: call % len(names)]:
            started = time.perf_counter()
            variants[name]()
            if call >= warmup:
                samples[name].append(time.perf_counter() - started)
    return {name: statistics.median(v) for name, v in samples.items()}


def time_global(arch: str, calls: int) -> dict[str, float]:
    """Milliseconds per step to select every mask of `arch` (CIFAR shape): per layer with hints, and the
    global top-k with each masker; the scores drift between calls as in `time_size`."""
    from maskforge import archs
    from maskforge.layers import masked_modules
    from maskforge.topk import global_topk_masks

    model = archs.create_model(arch, in_channels=3, num_classes=10, image_size=(32, 32), k=0.5, seed=0)
    scores = [layer.scores.detach() for layer in masked_modules(model).values()]
    hints = [ThresholdHint() for _ in scores]
    global_hint = ThresholdHint()
    if not all(
        torch.equal(a, b)
        for a, b in zip(global_topk_masks(scores, 0.5, masker="numpy"), global_topk_masks(scores, 0.5, masker="torch"))
    ):
        raise SystemExit("the two maskers disagree on the global masks")
    variants = {
        "per_layer_numpy": lambda: [
            topk_mask(s.abs(), max(1, s.numel() // 2), h, masker="numpy") for s, h in zip(scores, hints)
        ],
        "global_numpy": lambda: global_topk_masks(scores, 0.5, masker="numpy", hint=global_hint),
        "global_torch": lambda: global_topk_masks(scores, 0.5, masker="torch"),
    }
    gen = torch.Generator().manual_seed(5)

    def drift() -> None:
        for s in scores:
            s.add_(torch.randn(s.shape, generator=gen) * float(s.abs().mean()) * 2e-3)

    medians = _rotating_medians(variants, calls, warmup=2, between=drift)
    return {name: seconds * 1e3 for name, seconds in medians.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", help="layer sizes (default: fc, conv4, resnet18)")
    parser.add_argument("--calls", type=int, default=40, help="timed calls per method and size")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads")
    parser.add_argument("--no-sort", action="store_true", help="skip the (slow) full sort")
    parser.add_argument(
        "--global-arch",
        action="append",
        choices=("fc", "conv4", "resnet18"),
        help="also time whole-model selection (per layer vs global top-k) for this arch",
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    checked = check_exact()
    methods = [m for m in METHODS if not (args.no_sort and m == "sort")]
    header = {
        "checked_exact": checked,
        "threads": torch.get_num_threads(),
        "load_avg": os.getloadavg()[0],
        "band_min_size": BAND_MIN_SIZE,
    }
    print(
        json.dumps(header)
        if args.json
        else f"all methods exact on {checked} oracle checks; threads {header['threads']}, "
        f"load {header['load_avg']:.1f}; microseconds per call (median):"
    )
    for n in args.sizes or list(DEFAULT_SIZES):
        row = time_size(n, args.calls, methods)
        st = time_straight_through(n, args.calls)
        record = {
            "numel": n,
            "layer": DEFAULT_SIZES.get(n),
            **{f"{k}_us": v for k, v in row.items()},
            **{f"{k}_us": v for k, v in st.items()},
        }
        if args.json:
            print(json.dumps(record), flush=True)
        else:
            print(
                f"{n:>9d} {DEFAULT_SIZES.get(n) or '':16s} "
                + "  ".join(f"{k} {v:.0f}" for k, v in row.items())
                + " | "
                + "  ".join(f"{k} {v:.0f}" for k, v in st.items()),
                flush=True,
            )
    for arch in args.global_arch or []:
        row = time_global(arch, max(3, args.calls // 4))
        record = {"arch": arch, **{f"{k}_ms": v for k, v in row.items()}}
        print(
            json.dumps(record)
            if args.json
            else f"{arch} whole model (ms per step): " + "  ".join(f"{k} {v:.1f}" for k, v in row.items()),
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

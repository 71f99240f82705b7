"""Exact top-k selection: the per-layer mask, the global (all-layer) masks, and the two maskers.

A *masker* is the implementation that picks the kept entries. Both give exactly the mask of a stable
descending sort; they differ only in speed and in where they run:

* ``"numpy"`` — NumPy introselect (`np.partition`, linear time, no index array), narrowed by a
  `ThresholdHint` (the previous threshold's band) on large layers. Fastest on the CPU. On a CUDA tensor
  it copies the magnitudes to the host and the mask back: still exact, but it synchronizes the device
  on every call, so it is a checking tool there, not a fast path. Inside `torch.compile` it runs eagerly
  (a graph break), since the compiler cannot trace NumPy's partition.
* ``"torch"`` — the threshold from `torch.topk` and a prefix count over the entries tied with it:
  tensor operations only, no host sync, traceable by `torch.compile`. The fast path on CUDA; on the
  CPU it runs the exact code a GPU search runs.

`None` (or ``"auto"``) follows the tensor: ``"torch"`` on accelerators and inside `torch.compile`,
``"numpy"`` on the CPU.

Tie rule (both maskers, per layer): order entries by (-value, flat C-order index) and keep the first
`kept`; NaN counts as larger than every number (as in `torch.sort`), so NaN entries are kept first.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .errors import MaskforgeError
from .schema.artifact import TOPK_RULES  # noqa: F401 - the one list of rules (the schema's), re-exported

MASKERS = ("numpy", "torch")


def kept_count(numel: int, k: float) -> int:
    """How many weights a layer keeps: round(k * n) (half to even, Python's round), at least 1."""
    return max(1, min(numel, round(k * numel)))


def check_masker(name: str | None) -> str | None:
    """`name` if it is a masker (`None` and "auto" mean: follow the device); else a MaskforgeError."""
    if name is None or name == "auto":
        return None
    if name not in MASKERS:
        raise MaskforgeError(f"unknown masker {name!r}; choose from: auto, {', '.join(MASKERS)}")
    return name


def resolve_masker(name: str | None, device: torch.device) -> str:
    """The masker that runs for a tensor on `device` ("auto"/None: torch off the CPU or when compiling)."""
    name = check_masker(name)
    if name is None:
        return "torch" if device.type != "cpu" or torch.compiler.is_compiling() else "numpy"
    return name


class ThresholdHint:
    """A layer's last top-k threshold, so the next selection only has to look inside a narrow band.

    Pure speed-up state for the numpy masker: every hint is verified and a full selection runs when the
    band misses, so the mask never depends on it. Scores move little per optimizer step, hence so does
    the threshold; the band's half-width follows the observed moves (4x the last one, decaying by half).
    """

    __slots__ = ("threshold", "width")

    def __init__(self) -> None:
        self.threshold: float | None = None
        self.width = 0.0

    def update(self, value: float, hit: bool) -> None:
        if not math.isfinite(value):
            self.threshold = None
            return
        moved = abs(value - self.threshold) if self.threshold is not None else abs(value) * 1e-3
        floor = abs(value) * 2.0**-20 + 1e-30
        self.width = max(4.0 * moved, (0.5 if hit else 2.0) * self.width, floor)
        self.threshold = value


def topk_mask(
    magnitudes: torch.Tensor, kept: int, hint: ThresholdHint | None = None, *, masker: str | None = None
) -> torch.Tensor:
    """Boolean mask of the `kept` largest entries of `magnitudes` (any shape), exactly as a stable sort.

    Ties go to the lowest flat (C-order) index; NaN counts as the largest value (module docstring).
    `masker`: "numpy", "torch", or None/"auto" (follow the device); `hint` speeds up the numpy masker.

    >>> topk_mask(torch.tensor([0.5, 2.0, 0.5, 1.0]), 2).tolist()
    [False, True, False, True]
    """
    name = resolve_masker(masker, magnitudes.device)
    numel = magnitudes.numel()
    if kept >= numel:
        return torch.ones_like(magnitudes, dtype=torch.bool)
    if kept <= 0:
        return torch.zeros_like(magnitudes, dtype=torch.bool)
    flat = magnitudes.detach().reshape(-1)
    if name == "torch":
        return torch_select(flat, kept).view(magnitudes.shape)
    mask = numpy_select(as_numpy(flat), kept, hint)
    return torch.from_numpy(mask).to(magnitudes.device).view(magnitudes.shape)


# --- the torch masker -----------------------------------------------------------------------------------


def torch_select(flat: torch.Tensor, kept: int) -> torch.Tensor:
    """The top-`kept` mask of a 1-D tensor, 0 < kept < numel, with tensor operations only (no host sync).

    The threshold is the kept-th largest value, read off `torch.topk` (the smaller side: the `kept`
    largest or the numel - kept + 1 smallest). On CUDA, topk runs a multi-block radix select over one
    long row, where `torch.kthvalue` gives a whole layer to a single thread block. topk ranks NaN above
    every number (CPU and CUDA), so the threshold is NaN exactly when at least `kept` entries are NaN.
    Entries strictly above it are kept; of those equal to it (NaN "equals" NaN here), the first ones in
    flat order fill the remaining room (a prefix count).
    """
    numel = flat.numel()
    if kept <= numel - kept + 1:
        values = torch.topk(flat, kept, largest=True, sorted=False).values
        if flat.is_floating_point():  # the smallest of the kept values, NaN only if they all are
            nan = torch.isnan(values)
            smallest = torch.where(nan, torch.full_like(values, float("inf")), values).min()
            threshold = torch.where(nan.all(), values[0], smallest)
        else:
            threshold = values.min()
    else:  # the largest of the numel - kept + 1 smallest; max() propagates NaN as intended
        threshold = torch.topk(flat, numel - kept + 1, largest=False, sorted=False).values.max()
    if flat.is_floating_point():
        nan_threshold = torch.isnan(threshold)
        above = ~(flat <= threshold) & ~nan_threshold  # NaN entries are above any number
        at = torch.where(nan_threshold, torch.isnan(flat), flat == threshold)
    else:
        above, at = flat > threshold, flat == threshold
    room = kept - above.sum()
    count_dtype = torch.int32 if numel < 2**31 else torch.int64
    return above | (at & (torch.cumsum(at, 0, dtype=count_dtype) <= room))


# --- the numpy masker -----------------------------------------------------------------------------------

NUMPY_DTYPES = (torch.float32, torch.float64, torch.float16)
BAND_MIN_SIZE = 16384  # below this a full partition costs less than the band's extra passes


def as_numpy(flat: torch.Tensor) -> np.ndarray:
    """A NumPy view (or, for other dtypes and devices, a copy) of `flat` that keeps the order exactly."""
    if flat.device.type != "cpu":
        flat = flat.cpu()  # synchronizes the device: the numpy masker off the CPU is for checking
    if flat.dtype == torch.bfloat16:
        flat = flat.float()  # exact: float32 holds every bfloat16
    elif flat.dtype not in NUMPY_DTYPES:
        flat = flat.double()  # integers and others: float64 keeps their order
    return flat.numpy()


def numpy_select(values: np.ndarray, kept: int, hint: ThresholdHint | None = None) -> np.ndarray:
    """The exact top-`kept` boolean mask of a flat array, 0 < kept < size (see `topk_mask`)."""
    use_band = hint is not None and values.size >= BAND_MIN_SIZE
    if use_band and hint.threshold is not None:
        mask = _band_select(values, kept, hint)
        if mask is not None:
            return mask
    if np.isnan(values.max()):  # one cheap pass; a diverged search, never the hot path
        return _stable_sort_mask(values, kept)
    cut = values.size - kept
    threshold = np.partition(values, cut)[cut]
    mask = values >= threshold
    count = int(np.count_nonzero(mask))
    if count > kept:  # entries equal to the threshold straddle the cut: the lowest indices stay
        tied = np.flatnonzero(values == threshold)
        mask[tied[tied.size - (count - kept) :]] = False
    if use_band:
        hint.update(float(threshold), False)
    return mask


def _band_select(values: np.ndarray, kept: int, hint: ThresholdHint) -> np.ndarray | None:
    """The mask, if the threshold lies in the hint's band [low, high]; else None (a full selection runs).

    Everything above the band is kept and everything below dropped; only the band (a few hundred
    entries) is partitioned, and the mask is `above` plus the band's winners, so no pass over the whole
    layer follows the two comparisons. NaN, neither above nor below, lands in the band and is caught there.
    """
    dtype = values.dtype.type
    low, high = dtype(hint.threshold - hint.width), dtype(hint.threshold + hint.width)
    above = values > high
    n_above = int(np.count_nonzero(above))
    room = kept - n_above  # the threshold is the room-th largest entry of the band
    if room <= 0:
        return None
    outside = values < low
    np.logical_or(outside, above, out=outside)
    np.logical_not(outside, out=outside)
    where = np.flatnonzero(outside)  # ascending: ties then go to the lowest index
    band = values[where]
    if room > band.size or np.isnan(band).any():
        return None
    threshold = np.partition(band, band.size - room)[band.size - room]
    wins = band > threshold
    above[where[wins]] = True
    tied = where[band == threshold]
    above[tied[: room - int(np.count_nonzero(wins))]] = True
    hint.update(float(threshold), True)
    return above


def _stable_sort_mask(values: np.ndarray, kept: int) -> np.ndarray:
    order = torch.sort(torch.from_numpy(values), descending=True, stable=True).indices[:kept]
    mask = np.zeros(values.size, dtype=bool)
    mask[order.numpy()] = True
    return mask


# --- global top-k -----------------------------------------------------------------------------------------


def global_kept_count(sizes: list[int], k: float) -> int:
    """Weights kept in all by the global rule: kept_count(total, k), but at least one per layer."""
    return max(len(sizes), kept_count(sum(sizes), k))


def global_topk_masks(
    scores: list[torch.Tensor], k: float, *, masker: str | None = None, hint: ThresholdHint | None = None
) -> list[torch.Tensor]:
    """Boolean masks (one per tensor, same shapes) of the global top-k of |scores| over all layers.

    The rule, exactly: let N be the total number of entries, L the number of layers and
    K = max(L, kept_count(N, k)). Every layer first keeps its own largest |score| (ties: lowest flat
    index; NaN largest). The other K - L kept entries are the largest of all remaining entries, ordered
    by (-|score|, layer position in `scores`, flat C-order index). So K entries are kept in all, every
    layer keeps at least one, and when each layer's largest entry is among the overall top K anyway (the
    usual case), the result is simply the top K of the concatenated |scores| in that order.

    >>> [m.tolist() for m in global_topk_masks([torch.tensor([3.0, 1.0]), torch.tensor([0.1, 2.0])], 0.5)]
    [[True, False], [False, True]]
    """
    if not scores:
        raise MaskforgeError("global top-k needs at least one masked layer")
    devices = {s.device for s in scores}
    if len(devices) > 1:
        raise MaskforgeError(f"global top-k needs every masked layer on one device, found {sorted(map(str, devices))}")
    # Each layer's own largest entry is kept outright and leaves the pool (every |score| is >= 0 or NaN):
    # argmax (NumPy's and torch's, CPU and CUDA) breaks ties by the lowest index and ranks NaN highest.
    sizes = [s.numel() for s in scores]
    rest = global_kept_count(sizes, k) - len(sizes)  # kept beyond each layer's own best
    dtype = torch.float64 if any(s.dtype == torch.float64 for s in scores) else torch.float32
    device = scores[0].device
    if resolve_masker(masker, device) == "numpy" and device.type == "cpu":
        # NumPy end to end: torch's multi-threaded small ops cost more than they save here
        pool = np.concatenate([as_numpy(s.detach().reshape(-1).to(dtype)) for s in scores])  # one copy
        np.abs(pool, out=pool)
        parts = np.split(pool, np.cumsum(sizes)[:-1])
        best = np.cumsum([0] + sizes[:-1]) + [int(np.argmax(part)) for part in parts]
        pool[best] = -1.0
        kept_np = numpy_select(pool, rest, hint) if 0 < rest < pool.size else np.full(pool.size, rest > 0)
        kept_np[best] = True
        kept = torch.from_numpy(kept_np)
    else:
        pool = torch.cat([s.detach().reshape(-1).to(dtype).abs() for s in scores])
        # Offsets as Python ints: a tensor built from host data each step would be a copy that waits for
        # the GPU stream (a sync per step).
        starts = np.cumsum([0] + sizes[:-1]).tolist()
        best = torch.stack([torch.argmax(part) + start for part, start in zip(pool.split(sizes), starts)])
        pool[best] = -1.0
        kept = topk_mask(pool, rest, hint, masker=masker)
        kept[best] = True
    return [part.view(s.shape) for part, s in zip(kept.split(sizes), scores)]

"""Will a forward pass fit in memory? An estimate made before anything large is allocated.

An artifact may be valid and small and still describe a network whose activations cannot fit: ResNet-152
at 8192x8192 is an 8 MB file whose first convolution alone outputs 4 GiB per image. Running it would end
in an allocation failure deep inside PyTorch or onnxruntime (or in swapping for hours). `check_fits` runs
the network once on the meta device (shapes only: no memory, no arithmetic), tallies the bytes of the
tensors alive at once (`forward_peak_bytes`), and refuses with one line when that exceeds the memory this
process may still use (`available_bytes`).

The tally works for any `nn.Module` (maskforge's architectures, torchvision's, a user's): every ATen op
of the forward pass is seen through a `TorchDispatchMode`, each new tensor counts from its creation until
Python frees it, and views and in-place results count once. It is a lower bound of what eager PyTorch
needs (kernels' own workspaces are not seen) and a fair estimate of onnxruntime's activation memory.

>>> from torch import nn
>>> forward_peak_bytes(nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU()), (2, 1, 16, 16))
32768
"""

from __future__ import annotations

import logging
import os
import weakref
from typing import Sequence

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from .errors import MaskforgeError

log = logging.getLogger(__name__)


class _LiveBytes(TorchDispatchMode):
    """Counts the bytes of the tensors the ops create, until each is freed; remembers the peak."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._alive: dict[int, int] = {}  # storage -> bytes

    @staticmethod
    def _storage(tensor: torch.Tensor) -> int:
        return tensor.untyped_storage()._cdata

    def _free(self, key: int) -> None:
        self.live -= self._alive.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {self._storage(t) for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for tensor in tree_flatten(out)[0]:
            if not isinstance(tensor, torch.Tensor):
                continue
            key = self._storage(tensor)
            if key in inputs or key in self._alive:  # a view, or an in-place result: no new memory
                continue
            size = tensor.untyped_storage().nbytes()
            self._alive[key] = size
            self.live += size
            self.peak = max(self.peak, self.live)
            weakref.finalize(tensor, self._free, key)
        return out


def forward_peak_bytes(model: nn.Module, input_shape: Sequence[int], dtype: torch.dtype = torch.float32) -> int | None:
    """Peak bytes of the tensors alive at once during one inference forward pass of `model` on an input of
    `input_shape` (the input itself and the weights not included), or None when the model cannot run on
    the meta device (an op without a meta kernel: the caller then goes ahead unchecked).

    `model` may hold real weights: they are swapped for meta tensors for this one call, never copied."""
    from torch.func import functional_call

    state = {
        name: torch.empty_like(value, device="meta")
        for name, value in [*model.named_parameters(), *model.named_buffers()]
    }
    x = torch.empty(tuple(input_shape), dtype=dtype, device="meta")
    tally = _LiveBytes()
    try:
        with torch.no_grad(), tally:
            functional_call(model, state, (x,))
    except Exception as exc:  # noqa: BLE001 - any failure means "cannot estimate", never "does not fit"
        log.debug("no memory estimate for %s: %s: %s", type(model).__name__, type(exc).__name__, exc)
        return None
    return tally.peak


def available_bytes() -> int | None:
    """The memory this process may still allocate: the least of the system's available memory, the
    cgroup's remaining limit (containers, Slurm) and the address-space limit (`ulimit -v`); None when
    none of them can be read."""
    found = [
        value for value in (_meminfo_available(), _cgroup_remaining(), _address_space_remaining()) if value is not None
    ]
    return min(found) if found else None


def check_fits(model: nn.Module, input_shape: Sequence[int], what: str, advice: str) -> None:
    """Refuse with one line when a forward pass of `model` on `input_shape` (batch first) needs more memory
    than is available. `what` says what would run ("exporting runs/x/artifact.safetensors"), `advice` what
    to do instead ("give --batch-size 1")."""
    peak = forward_peak_bytes(model, input_shape)
    available = available_bytes()
    if peak is None or available is None:
        return
    needed = peak + _numel(input_shape) * 4
    if needed > available:
        batch, *item = input_shape
        raise MaskforgeError(
            f"{what} needs about {format_bytes(needed)} of memory for the activations of {batch} "
            f"{'x'.join(map(str, item))} input{'s' if batch != 1 else ''} (estimated from the network's "
            f"layers), more than the {format_bytes(available)} available; {advice}"
        )


def check_network_fits(model: nn.Module, spec, batch: int, what: str, smaller_batch: str | None = None) -> None:
    """`check_fits` for a network taking `spec`'s images (an `InputSpec`), `batch` at a time. The advice:
    `smaller_batch` (how to ask for one) when more than one image runs at once, else a machine with more
    memory or a smaller image size (an artifact fixes its input size)."""
    if batch > 1 and smaller_batch:
        advice = f"{smaller_batch} (or use a machine with more memory)"
    else:
        advice = (
            "use a machine with more memory (the input size is fixed by the model: a smaller one needs "
            "a search at a smaller image size)"
        )
    check_fits(model, (batch, spec.channels, spec.height, spec.width), what, advice)


def format_bytes(value: int) -> str:
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if value >= scale:
            return f"{value / scale:.1f} {unit}"
    return f"{value} bytes"


def _numel(shape: Sequence[int]) -> int:
    count = 1
    for side in shape:
        count *= int(side)
    return count


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="ascii") as handle:
            return handle.read()
    except (OSError, ValueError):
        return None


def _meminfo_available() -> int | None:
    text = _read("/proc/meminfo")
    if text is not None:
        for line in text.splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def _cgroup_remaining() -> int | None:
    for limit_file, usage_file in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
    ):
        limit, usage = _read(limit_file), _read(usage_file)
        if limit is None or usage is None:
            continue
        limit, usage = limit.strip(), usage.strip()
        if not (limit.isdigit() and usage.isdigit()) or int(limit) >= 2**60:  # "max": no limit
            return None
        return max(0, int(limit) - int(usage))
    return None


def _address_space_remaining() -> int | None:
    try:
        import resource
    except ImportError:
        return None
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft == resource.RLIM_INFINITY:
        return None
    status = _read("/proc/self/status")
    used = next(
        (int(line.split()[1]) * 1024 for line in (status or "").splitlines() if line.startswith("VmSize:")), None
    )
    return None if used is None else max(0, soft - used)

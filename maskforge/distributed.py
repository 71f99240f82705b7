"""Running under `torchrun`: detect the launch, join the process group, and the few collectives search uses.

A search is distributed exactly when torchrun (or any launcher that sets the same variables) started it
with `WORLD_SIZE > 1`; otherwise every helper here is a no-op and nothing in `torch.distributed` is touched.

* Backend: `gloo` on CPU-only machines; `cpu:gloo,cuda:nccl` where CUDA exists, so CUDA tensors (DDP's
  gradient all-reduce, the per-step batch-norm sync) go through NCCL and small CPU bookkeeping
  (broadcasting the plan of the run, gathering metric sums) through gloo.
* Rank 0 decides (reads the run folder, validates) and broadcasts; every rank then fails, or proceeds,
  together — a bad `--resume` folder gives the same one-line error on every rank instead of a hang.

>>> world = detect({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"})
>>> world.rank, world.world_size, world.is_main
(1, 2, False)
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
import torch.distributed as dist

from .errors import MaskforgeError

#: How long a collective may wait for a slow rank (data loading, rank 0 writing a big checkpoint).
TIMEOUT = timedelta(minutes=30)


@dataclass(frozen=True)
class World:
    """Where this process sits: its global rank, the number of processes, and its rank on this node."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the only process that writes files and draws progress."""
        return self.rank == 0


def detect(environ: Mapping[str, str] | None = None) -> World:
    """The `World` described by torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE)."""
    env = os.environ if environ is None else environ
    if "WORLD_SIZE" not in env:
        return World()

    def integer(name: str, default: int) -> int:
        raw = env.get(name)
        if raw is None:
            return default
        try:
            return int(raw)
        except ValueError:
            raise MaskforgeError(
                f"environment variable {name}={raw!r} is not an integer (set by torchrun; do not set it by hand)"
            ) from None

    world_size = integer("WORLD_SIZE", 1)
    rank = integer("RANK", 0)
    local_rank = integer("LOCAL_RANK", rank)
    local_world_size = integer("LOCAL_WORLD_SIZE", world_size)
    if world_size < 1 or not 0 <= rank < world_size or not 0 <= local_rank < max(local_world_size, 1):
        raise MaskforgeError(
            f"inconsistent torchrun environment: RANK={rank} WORLD_SIZE={world_size} "
            f"LOCAL_RANK={local_rank} LOCAL_WORLD_SIZE={local_world_size}"
        )
    return World(rank, world_size, local_rank, local_world_size)


def local_device(world: World, kind: str) -> torch.device:
    """The device this process computes on: `cuda:<local rank>` for CUDA (one GPU per process), else CPU."""
    if kind != "cuda":
        return torch.device(kind)
    count = torch.cuda.device_count()
    if world.local_world_size > count:
        raise MaskforgeError(
            f"{world.local_world_size} processes on this node but only {count} CUDA "
            f"device(s): start torchrun with --nproc-per-node {count} or fewer"
        )
    return torch.device("cuda", world.local_rank)


@contextlib.contextmanager
def process_group(world: World) -> Iterator[None]:
    """Join the default process group for the duration of the block (if distributed and not joined yet)."""
    if not world.is_distributed:
        yield
        return
    if dist.is_initialized():  # the caller's own script set it up: use it, leave it to them
        if dist.get_world_size() != world.world_size or dist.get_rank() != world.rank:
            raise MaskforgeError("the initialized process group does not match RANK/WORLD_SIZE")
        yield
        return
    if torch.cuda.is_available():
        # NCCL needs each process bound to its own GPU before the group forms.
        torch.cuda.set_device(world.local_rank % torch.cuda.device_count())
        backend = "cpu:gloo,cuda:nccl"
    else:
        backend = "gloo"
    try:
        dist.init_process_group(
            backend=backend, rank=world.rank, world_size=world.world_size, timeout=TIMEOUT, store=_attempt_store(world)
        )
    except (ValueError, RuntimeError) as exc:
        raise MaskforgeError(
            f"cannot join the torchrun process group ({backend}): {' '.join(str(exc).split())}"
        ) from None
    try:
        yield
    finally:
        dist.destroy_process_group()


def _attempt_store(world: World):
    """Under torchrun's shared agent store, a store of this elastic attempt's own (None: the default).

    The agent keeps one store across `--max-restarts` restarts, and the process group's keys (gloo's
    peer addresses among them) would be found by the restarted workers and lead them to dead peers: the
    restart hangs. Older torch prefixed each attempt itself (`/worker/attempt_N`); we do the same.
    """
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if attempt is None or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    store, _, _ = next(dist.rendezvous("env://", world.rank, world.world_size, timeout=TIMEOUT))
    return dist.PrefixStore(f"maskforge/attempt_{attempt}", store)


def run_on_main(fn: Callable[[], Any], world: World, what: str = "") -> Any:
    """Run `fn` on rank 0 only and give every rank its result, or make every rank raise its error.

    A `MaskforgeError` on rank 0 becomes the same `MaskforgeError` everywhere (so all ranks exit 2
    together); any other failure re-raises on rank 0 and becomes a RuntimeError on the others.
    """
    if not world.is_distributed:
        return fn()
    message = None
    if world.is_main:
        try:
            message = ("ok", fn())
        except MaskforgeError as exc:
            message = ("error", str(exc))
        except BaseException as exc:
            broadcast_object(("crash", f"{type(exc).__name__}: {exc}"), world)
            raise
    kind, payload = broadcast_object(message, world)
    if kind == "error":
        raise MaskforgeError(payload)
    if kind == "crash":
        raise RuntimeError(f"rank 0 failed{what}: {payload}")
    return payload


def broadcast_object(obj: Any, world: World) -> Any:
    """Rank 0's `obj` on every rank (small picklable values only: plans, JSON documents)."""
    if not world.is_distributed:
        return obj
    box = [obj if world.is_main else None]
    dist.broadcast_object_list(box, src=0, device=torch.device("cpu"))
    return box[0]


def broadcast_tensors(tensors: Sequence[torch.Tensor], world: World) -> None:
    """Overwrite every tensor (in place, any device or memory format) with rank 0's value."""
    if not world.is_distributed:
        return
    for tensor in tensors:
        if tensor.is_contiguous():
            dist.broadcast(tensor, src=0)
        else:  # e.g. channels_last: collectives want a dense standard layout
            buffer = tensor.contiguous()
            dist.broadcast(buffer, src=0)
            tensor.copy_(buffer)


def weighted_sum_(tensors: Sequence[torch.Tensor], weight: float, world: World) -> None:
    """Replace each float tensor by the sum over ranks of `weight * tensor` (each rank gives its own weight),
    with one all-reduce over a flat copy. Weights that add up to 1 give a weighted average."""
    if not world.is_distributed or not tensors:
        return
    flat = torch.cat([t.reshape(-1).float() for t in tensors])
    flat *= weight
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for tensor in tensors:
        n = tensor.numel()
        tensor.copy_(flat[offset : offset + n].view_as(tensor))
        offset += n


def gather_rows(values: Sequence[float], world: World) -> list[list[float]]:
    """Every rank's `values` (float64), in rank order: `[[rank 0 values], [rank 1 values], ...]`."""
    row = torch.tensor([float(v) for v in values], dtype=torch.float64)
    if not world.is_distributed:
        return [row.tolist()]
    rows = [torch.empty_like(row) for _ in range(world.world_size)]
    dist.all_gather(rows, row)
    return [r.tolist() for r in rows]


def sum_over_ranks(values: Sequence[float], world: World) -> list[float]:
    """Element-wise sum of `values` over ranks, added in rank order (so every rank gets the same bits)."""
    rows = gather_rows(values, world)
    totals = [0.0] * len(values)
    for row in rows:
        totals = [a + b for a, b in zip(totals, row)]
    return totals


def check_identical(digest: bytes, what: str, world: World) -> None:
    """Raise on every rank if any rank's `digest` differs from rank 0's (a consistency check, not a user error)."""
    if not world.is_distributed:
        return
    mine = torch.frombuffer(bytearray(hashlib.sha256(digest).digest()), dtype=torch.uint8)
    rows = [torch.empty_like(mine) for _ in range(world.world_size)]
    dist.all_gather(rows, mine)
    differing = [rank for rank, row in enumerate(rows) if not torch.equal(row, rows[0])]
    if differing:
        raise RuntimeError(
            f"{what} differ between processes: rank(s) {differing} disagree with rank 0 "
            f"(this is a bug in the distributed search; please report it)"
        )


def barrier(world: World) -> None:
    if world.is_distributed:
        dist.barrier()

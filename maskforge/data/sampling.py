"""Batches of one epoch: a pure function of (seed, epoch, rank, world size, start batch).

That is what makes a search reproducible on any number of processes and resumable mid-epoch. The
batcher is ours, not a `DistributedSampler`: `batch_size` is the GLOBAL batch, split within each step
(so one and N processes see the same examples per step, the short last batch included), and a resumed
epoch skips the batches already done without loading them.
"""

from __future__ import annotations

import hashlib
import signal
import traceback
from typing import Iterator

import torch

from ..errors import MaskforgeError
from .datasets import InMemoryImages


def num_batches(dataset_len: int, batch_size: int, *, drop_last: bool = False) -> int:
    """Global batches per epoch (the same count on every process), matching `iterate_batches`."""
    if batch_size <= 0:
        raise MaskforgeError(f"batch size must be positive, got {batch_size}")
    return dataset_len // batch_size if drop_last else -(-dataset_len // batch_size)


def derive_seed(domain: str, *values: int) -> int:
    """A 64-bit seed from a domain name and integers: the first 8 bytes (little-endian) of
    SHA-256(domain 0x00 decimal(v1) 0x00 decimal(v2) ...). Hashing, not arithmetic, so that every seed
    the artifact format allows (up to 2^63 - 1) gives a valid generator seed."""
    payload = b"\x00".join([domain.encode("ascii")] + [str(int(v)).encode("ascii") for v in values])
    return int.from_bytes(hashlib.sha256(payload).digest()[:8], "little")


def epoch_order(n: int, *, shuffle: bool, seed: int, epoch: int) -> torch.Tensor:
    """The epoch's example order: a pure function of (seed, epoch) so any process can recompute it."""
    if not shuffle:
        return torch.arange(n)
    generator = torch.Generator().manual_seed(derive_seed("maskforge/order/v1", seed, epoch))
    return torch.randperm(n, generator=generator)


def iterate_batches(
    dataset: torch.utils.data.Dataset,
    batch_size: int,
    *,
    shuffle: bool,
    seed: int = 0,
    epoch: int = 0,
    drop_last: bool = False,
    start_batch: int = 0,
    rank: int = 0,
    world_size: int = 1,
    workers: int = 0,
    pin_memory: bool = False,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield `(uint8 [b, C, H, W], int64 [b])` CPU batches of one epoch for process `rank` of `world_size`.

    `batch_size` is the GLOBAL batch. The epoch order is `torch.randperm(n)` seeded with
    `derive_seed("maskforge/order/v1", seed, epoch)` (or 0..n-1 without shuffle); global batch `s` is
    positions `s*batch_size .. (s+1)*batch_size - 1` of it (the last one shorter unless `drop_last`), and
    rank r takes its positions r, r + world_size, r + 2*world_size, ... So the N local batches of step s
    together are exactly the one-process batch of step s, every example comes once per epoch, and a
    short last batch is shared as evenly as it allows (a rank may get none). The first `start_batch`
    batches are skipped without being loaded (resume mid-epoch).

    `InMemoryImages` are sliced directly; other data sets go through a `DataLoader` with `workers` processes.
    """
    if rank < 0 or world_size < 1 or rank >= world_size:
        raise ValueError(f"invalid rank {rank} for world size {world_size}")
    if start_batch < 0:
        raise ValueError(f"start_batch must be >= 0, got {start_batch}")
    n = len(dataset)
    total_batches = num_batches(n, batch_size, drop_last=drop_last)
    if n == 0 or start_batch >= total_batches:
        return
    order = epoch_order(n, shuffle=shuffle, seed=seed, epoch=epoch)
    batches = (
        order[b * batch_size : (b + 1) * batch_size][rank::world_size] for b in range(start_batch, total_batches)
    )

    if isinstance(dataset, InMemoryImages):
        pin = pin_memory and torch.cuda.is_available()
        for idx in batches:
            x, y = dataset.images[idx], dataset.labels[idx]
            yield (x.pin_memory(), y.pin_memory()) if pin else (x, y)
        return

    index_lists = [idx.tolist() for idx in batches]
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_sampler=[indices for indices in index_lists if indices],  # a DataLoader cannot load nothing
        num_workers=workers,
        pin_memory=pin_memory,
        persistent_workers=False,
        worker_init_fn=_leave_signals_to_the_main_process if workers else None,
    )
    batches_iter = iter(loader)
    try:
        for indices in index_lists:
            if not indices:  # this rank's share of a short last batch is empty
                yield torch.empty((0, *dataset.item_shape), dtype=torch.uint8), torch.empty(0, dtype=torch.int64)
                continue
            x, y = next(batches_iter)
            yield x, y.to(torch.int64)
    except MaskforgeError as exc:
        message = _worker_error_message(exc)
        traceback.clear_frames(exc.__traceback__)  # its frames hold the iterator in a reference cycle
    else:
        return
    finally:
        # Shut the workers down here, when the caller stops or fails: left to the garbage collector,
        # their shutdown stalls for seconds at some unrelated later moment.
        del batches_iter
    raise MaskforgeError(message)


def _leave_signals_to_the_main_process(worker_id: int) -> None:
    """Ctrl-C and SIGTERM reach every process of the job (terminal, Slurm); the search stops on them at its
    next step, which needs its loader's workers: they ignore both and end when the main process stops them."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)


def _worker_error_message(exc: MaskforgeError) -> str:
    """The original message of an error re-raised by a DataLoader worker (which prepends a traceback)."""
    lines = str(exc).strip().splitlines()
    prefix = f"{MaskforgeError.__module__}.{MaskforgeError.__qualname__}: "
    if len(lines) > 1 and lines[-1].startswith(prefix):
        return lines[-1][len(prefix) :]
    return str(exc)

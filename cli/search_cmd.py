"""`maskforge search`: run edge-popup and write the artifact."""

from __future__ import annotations

import sys
from typing import Annotated, Optional

import typer
from rich.console import Console

from maskforge.search import SearchConfig, search

from .app import app

_DEFAULTS = SearchConfig()


@app.command("search")
def search_command(
    arch: Annotated[str, typer.Option(help="Architecture to search (see `maskforge archs`).")] = _DEFAULTS.arch,
    k: Annotated[float, typer.Option("--k", help="Fraction of weights KEPT in every layer, in (0, 1].")]
    = _DEFAULTS.k,
    data: Annotated[str, typer.Option(help="mnist5k (built-in demo), or a CIFAR-10 / MNIST raw / image folder "
                                           "(train/ + val/ class subfolders).")] = _DEFAULTS.data,
    epochs: Annotated[int, typer.Option(help="Passes over the training split.")] = _DEFAULTS.epochs,
    max_steps: Annotated[Optional[int], typer.Option(help="Stop after this many optimizer steps (smoke runs).")]
    = None,
    batch_size: Annotated[int, typer.Option(help="Images per step (per process under torchrun).")]
    = _DEFAULTS.batch_size,
    lr: Annotated[float, typer.Option(help="Peak learning rate of the scores (cosine schedule).")] = _DEFAULTS.lr,
    momentum: Annotated[float, typer.Option(help="SGD momentum.")] = _DEFAULTS.momentum,
    weight_decay: Annotated[float, typer.Option(help="Weight decay on the scores.")] = _DEFAULTS.weight_decay,
    label_smoothing: Annotated[float, typer.Option(help="Label smoothing (paper: 0.1 on ImageNet).")]
    = _DEFAULTS.label_smoothing,
    warmup_epochs: Annotated[int, typer.Option(help="Epochs of linear warm-up before the cosine decay.")]
    = _DEFAULTS.warmup_epochs,
    seed: Annotated[int, typer.Option(help="Seed of the random weights and scores; the artifact stores it.")]
    = _DEFAULTS.seed,
    init: Annotated[str, typer.Option(help="Weight distribution: signed_constant, kaiming_normal or "
                                           "unsigned_constant.")] = _DEFAULTS.init,
    scale_fan: Annotated[bool, typer.Option("--scale-fan/--no-scale-fan",
                                            help="Use sigma = sqrt(2/(k*fan_in)) (the subnetwork's fan-in).")]
    = _DEFAULTS.scale_fan,
    device: Annotated[str, typer.Option(help="auto (CUDA when present), cpu or cuda.")] = _DEFAULTS.device,
    workers: Annotated[int, typer.Option(help="Data-loader processes for image folders.")] = _DEFAULTS.workers,
    image_size: Annotated[Optional[int], typer.Option(help="Image folders: resize images to this side.")] = None,
    out: Annotated[str, typer.Option(help="Run folder for artifact.safetensors, metrics.jsonl, config.json.")]
    = _DEFAULTS.out,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Search a subnetwork of a seeded random network with edge-popup and save it as an artifact.

    Only the scores are trained; the weights stay at their seeded random values. The artifact stores the
    seed, one bit per weight and the batch-norm statistics.

    Example: maskforge search --arch conv4 --k 0.5 --epochs 10 --out runs/conv4
    """
    config = SearchConfig(arch=arch, k=k, data=data, epochs=epochs, max_steps=max_steps, batch_size=batch_size,
                          lr=lr, momentum=momentum, weight_decay=weight_decay, label_smoothing=label_smoothing,
                          warmup_epochs=warmup_epochs, seed=seed, init=init, scale_fan=scale_fan, device=device,
                          workers=workers, image_size=image_size, out=out)
    result = search(config, progress=not quiet and sys.stderr.isatty())
    console = Console()
    art = result.artifact
    last = result.metrics[-1]
    console.print(f"[bold green]done[/]: {art.arch} k={art.k} seed={art.seed}  held-out accuracy "
                  f"{last['heldout_acc']:.2%} after {last['epoch']} epoch(s), {last['step']} steps")
    console.print(f"artifact {result.artifact_path} ({art.file_bytes:,} bytes, "
                  f"{8 * art.file_bytes / art.masked_weights:.3f} bits per masked weight)")

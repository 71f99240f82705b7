"""`maskforge search`: run edge-popup and write the artifact (or continue a run with --resume)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from maskforge.search import SearchConfig, resume, search

from .app import app

_DEFAULTS = SearchConfig()
_GIVEN = ("COMMANDLINE", "ENVIRONMENT", "PROMPT")  # parameter sources that mean "the user set this"


@app.command("search")
def search_command(
    ctx: typer.Context,
    arch: Annotated[str, typer.Option(help="Architecture to search (see `maskforge archs`).")] = _DEFAULTS.arch,
    k: Annotated[float, typer.Option("--k", help="Fraction of weights KEPT in every layer, in (0, 1].")]
    = _DEFAULTS.k,
    data: Annotated[str, typer.Option(help="mnist5k (built-in demo), or a CIFAR-10 / MNIST raw / image folder "
                                           "(train/ + val/ class subfolders).")] = _DEFAULTS.data,
    epochs: Annotated[int, typer.Option(help="Passes over the training split.")] = _DEFAULTS.epochs,
    max_steps: Annotated[Optional[int], typer.Option(help="Stop after this many optimizer steps (smoke runs).")]
    = None,
    batch_size: Annotated[int, typer.Option(help="GLOBAL images per step: under torchrun each of N processes "
                                                 "takes batch-size/N (N must divide it). The lr belongs to "
                                                 "this global batch and is not rescaled by N.")]
    = _DEFAULTS.batch_size,
    lr: Annotated[float, typer.Option(help="Peak learning rate of the scores (cosine schedule), for the global "
                                           "batch.")] = _DEFAULTS.lr,
    momentum: Annotated[float, typer.Option(help="SGD momentum.")] = _DEFAULTS.momentum,
    weight_decay: Annotated[float, typer.Option(help="Weight decay on the scores.")] = _DEFAULTS.weight_decay,
    label_smoothing: Annotated[float, typer.Option(help="Label smoothing (the paper's ImageNet value; 0 gives its CIFAR recipe).")]
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
    device: Annotated[str, typer.Option(help="auto (CUDA when present), cpu or cuda; under torchrun each "
                                             "process uses cuda:LOCAL_RANK.")] = _DEFAULTS.device,
    workers: Annotated[Optional[int], typer.Option(help="Data-loader processes for image folders "
                                                        "(default: min(8, cores / processes per node)).")]
    = None,
    image_size: Annotated[Optional[int], typer.Option(help="Image folders: resize images to this side.")] = None,
    compile_model: Annotated[bool, typer.Option("--compile/--no-compile",
                                                help="torch.compile the model (worth it on GPU for long "
                                                     "searches; the first steps are slow).")]
    = _DEFAULTS.compile,
    checkpoint_every: Annotated[Optional[int], typer.Option(
        help="Also write DIR/checkpoint.safetensors every N optimizer steps (it is always written at the end "
             "of every epoch).")] = None,
    resume_dir: Annotated[Optional[Path], typer.Option(
        "--resume", metavar="DIR",
        help="Continue the search in run folder DIR from its checkpoint, with the arguments recorded in "
             "DIR/config.json. Only --workers and --checkpoint-every may change; any other option given must "
             "equal the recorded value. The final artifact is the one the uninterrupted search writes.")]
    = None,
    out: Annotated[str, typer.Option(help="Run folder for artifact.safetensors, metrics.jsonl, config.json, "
                                          "checkpoint.safetensors.")] = _DEFAULTS.out,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Search a subnetwork of a seeded random network with edge-popup and save it as an artifact.

    Only the scores are trained; the weights stay at their seeded random values. The artifact stores the
    seed, one bit per weight and the batch-norm statistics.

    Example: maskforge search --arch conv4 --k 0.5 --epochs 10 --out runs/conv4

    Several GPUs or nodes: start the same command with torchrun, e.g.
    torchrun --nproc-per-node 8 -m maskforge.cli search --arch wrn50 --data /imagenet --batch-size 256 ...
    (see docs/SCALE.md).
    """
    progress = not quiet and sys.stderr.isatty()
    values = {"arch": arch, "k": k, "data": data, "epochs": epochs, "max_steps": max_steps,
              "batch_size": batch_size, "lr": lr, "momentum": momentum, "weight_decay": weight_decay,
              "label_smoothing": label_smoothing, "warmup_epochs": warmup_epochs, "seed": seed,
              "init": init, "scale_fan": scale_fan, "device": device, "workers": workers,
              "image_size": image_size, "compile": compile_model, "checkpoint_every": checkpoint_every,
              "out": out}
    if resume_dir is not None:
        # Only the options typed on this command line are compared with the recorded run.
        params = {"compile": "compile_model"}
        given = {key: value for key, value in values.items() if _given(ctx, params.get(key, key))}
        result = resume(resume_dir, given, progress=progress)
    else:
        result = search(SearchConfig(**values), progress=progress)
    if result.rank != 0:
        return  # under torchrun only rank 0 reports
    console = Console()
    art = result.artifact
    last = result.metrics[-1]
    console.print(f"[bold green]done[/]: {art.arch} k={art.k} seed={art.seed}  held-out accuracy "
                  f"{last['heldout_acc']:.2%} after {last['epoch']} epoch(s), {last['step']} steps")
    console.print(f"artifact {result.artifact_path} ({art.file_bytes:,} bytes, "
                  f"{8 * art.file_bytes / art.masked_weights:.3f} bits per masked weight)")


def _given(ctx: typer.Context, name: str) -> bool:
    source = ctx.get_parameter_source(name)
    return source is not None and source.name in _GIVEN

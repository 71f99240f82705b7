"""Figures with matplotlib, each written as a PNG and an SVG (text kept as text, so a paper's fonts apply),
and one run's training curves: `plot_run(run_folder)` draws loss, held-out accuracy and learning rate per
epoch from `metrics.jsonl`. A sweep's figure (`maskforge.sweeps.figure`) is drawn with the same helpers.

Nothing here imports torch: `maskforge plot RUN` reads the run's files by their names (runfiles.py).
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import MaskforgeError
from .fileio import atomic_path, ensure_writable_dir
from .jsonread import strict_json
from .metricfiles import read_metrics
from .runfiles import CONFIG_NAME, CURVES_STEM, DENSE_RESULT_NAME, METRICS_NAME
from .spelling import spell


def pyplot():
    """matplotlib's pyplot, set up for files (no window) and SVG text kept as text."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never a window
    import matplotlib.pyplot as plt

    plt.rcParams.update({"svg.fonttype": "none", "font.size": 10, "axes.titlesize": 10})
    return plt


def save_figure(fig, stem: Path) -> list[Path]:
    """`fig` as STEM.png and STEM.svg, each written atomically; returns both paths."""
    ensure_writable_dir(stem.parent)
    if stem.suffix.lower() in (".png", ".svg"):  # a file name given: its stem (not "k0.1" -> "k0")
        stem = stem.with_suffix("")
    paths = []
    for suffix, extra in ((".png", {"dpi": 150}), (".svg", {})):
        path = stem.parent / (stem.name + suffix)
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format=suffix[1:], bbox_inches="tight", **extra)
        paths.append(path)
    return paths


# --- one run -----------------------------------------------------------------------------------------


def plot_run(run_dir: str | os.PathLike, *, stem: str | os.PathLike | None = None) -> list[Path]:
    """Loss, held-out accuracy and learning rate per epoch of a search (or dense) run folder.

    >>> plot_run("runs/conv4")        # doctest: +SKIP
    [PosixPath('runs/conv4/curves.png'), PosixPath('runs/conv4/curves.svg')]
    """
    run = Path(run_dir)
    metrics_path = run / METRICS_NAME
    if not metrics_path.exists():
        raise MaskforgeError(f"{metrics_path} does not exist: {run} is not a run folder, or no epoch has finished yet")
    metrics = read_metrics(run)
    if not metrics:
        raise MaskforgeError(f"{metrics_path} is empty: no epoch has finished yet")
    plt = pyplot()
    fig, (loss_ax, acc_ax, lr_ax) = plt.subplots(1, 3, figsize=(11, 3.6))
    epochs = [m["epoch"] for m in metrics]
    loss_ax.plot(epochs, [m["train_loss"] for m in metrics], marker="o", label="train")
    loss_ax.plot(epochs, [m["heldout_loss"] for m in metrics], marker="s", label="held-out")
    loss_ax.set_ylabel("cross-entropy loss (nats)")
    acc_ax.plot(epochs, [100 * m["train_acc"] for m in metrics], marker="o", label="train")
    acc_ax.plot(epochs, [100 * m["heldout_acc"] for m in metrics], marker="s", label="held-out")
    acc_ax.set_ylabel("accuracy (%)")
    lr_ax.plot(epochs, [m["lr"] for m in metrics], marker="o", color="gray")
    lr_ax.set_ylabel("learning rate at epoch end")
    for ax in (loss_ax, acc_ax, lr_ax):
        ax.set_xlabel("epoch")
        ax.grid(True, alpha=0.3)
    loss_ax.legend(fontsize=8)
    acc_ax.legend(fontsize=8)
    fig.suptitle(_run_title(run, metrics), fontsize=10)
    fig.tight_layout()
    paths = save_figure(fig, Path(stem) if stem else run / CURVES_STEM)
    plt.close(fig)
    return paths


def _run_title(run: Path, metrics: list[dict]) -> str:
    try:
        config = strict_json((run / CONFIG_NAME).read_bytes(), str(run / CONFIG_NAME), "the run config")
    except (OSError, MaskforgeError):
        config = None
    if not isinstance(config, dict):  # the title is a courtesy: a damaged config.json only shortens it
        return f"{run.name}: {len(metrics)} epochs"
    kind = "dense training" if (run / DENSE_RESULT_NAME).exists() or "optimizer" in config else "edge-popup"
    defaults = {"width": (None, 1), "topk": (None, "layer")}  # said only when not the default
    what = [f"{config.get('arch')}"] + [
        f"{key}={spell(config[key])}"
        for key in ("k", "init", "scale_fan", "width", "topk")
        if key in config and config[key] not in defaults.get(key, ())
    ]
    return (
        f"{kind}, {' '.join(what)} on {Path(str(config.get('data'))).name}: {len(metrics)} epochs, "
        f"batch {config.get('batch_size')}, lr {spell(config.get('lr'))}, seed {config.get('seed')}; "
        f"final held-out accuracy {100 * metrics[-1]['heldout_acc']:.2f} %"
    )

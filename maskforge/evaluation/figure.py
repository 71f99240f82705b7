"""The confusion matrix as a PNG figure (matplotlib, imported only when a figure is asked for).

Rows are the true classes, columns the predicted ones; each row is shaded by its share of the class's
examples (so rare classes are as readable as common ones) and, up to 30 classes, labelled with counts.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..errors import MaskforgeError
from ..fileio import atomic_path
from ..export import check_output_path, output_folder
from .report import Accuracy

MAX_ANNOTATED = 30  # above this many classes the counts would not fit in the cells


def save_confusion_png(accuracy: Accuracy, class_names: list[str], path: str | os.PathLike, title: str = "") -> Path:
    """Draw `accuracy.confusion` into a PNG at `path` (atomically; missing parent folders are created)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise MaskforgeError("the confusion-matrix figure needs matplotlib (pip install matplotlib)") from None
    path = check_output_path(path, "figure")
    counts = np.asarray(accuracy.confusion, dtype=np.int64)
    classes = counts.shape[0]
    totals = counts.sum(axis=1, keepdims=True)
    shares = np.divide(counts, totals, out=np.zeros(counts.shape), where=totals > 0)
    side = min(20.0, max(4.0, 0.45 * classes + 2.5))
    figure = Figure(figsize=(side + 1.2, side), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    image = axes.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0)
    figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04, label="share of the true class")
    ticks = np.arange(classes)
    labels = class_names if classes <= 60 else [""] * classes
    axes.set_xticks(ticks, labels, rotation=90 if classes > 10 else 0)
    axes.set_yticks(ticks, labels)
    axes.set_xlabel("predicted class")
    axes.set_ylabel("true class")
    axes.set_title(
        title
        or f"{accuracy.data} / {accuracy.split}: top-1 {accuracy.top1:.2%} "
        f"({accuracy.correct:,} of {accuracy.examples:,})",
        fontsize=10,
    )
    if classes <= MAX_ANNOTATED:
        for (row, column), value in np.ndenumerate(counts):
            if value:
                axes.text(
                    column,
                    row,
                    str(value),
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if shares[row, column] > 0.5 else "black",
                )
    figure.tight_layout()
    with output_folder(path), atomic_path(path) as tmp:
        figure.savefig(tmp, format="png")
    return path

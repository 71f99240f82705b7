"""`maskforge plot DIR`: the figure of a sweep folder (maskforge.sweeps.figure) or the training curves of
a run folder (maskforge.figures). A run folder's curves need neither the search nor torch: the sweep
package (which loads them) is imported only for a sweep folder.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from .errors import MaskforgeError
from .figures import plot_run
from .runfiles import SWEEP_FILE


def plot(
    folder: str | os.PathLike,
    *,
    x: str | None = None,
    hue: Sequence[str] | None = None,
    stem: str | os.PathLike | None = None,
    where: dict | None = None,
) -> list[Path]:
    """`maskforge plot DIR`: a sweep folder's figure (see `maskforge.sweeps.figure`; `where` selects points by their
    options) or a run folder's curves (`plot_run`)."""
    folder = Path(folder)
    if (folder / SWEEP_FILE).exists():
        from .sweeps import collect_sweep

        result = collect_sweep(folder, x=x, hue=hue, stem=stem, where=where)
        if not result.figures:
            raise MaskforgeError(f"{folder}: {result.figure_note}")
        return result.figures
    if x is not None or hue or where:
        raise MaskforgeError(f"{folder} is a run folder, not a sweep folder: --x, --hue and --where apply to sweeps")
    return plot_run(folder, stem=stem)

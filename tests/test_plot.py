"""Tests for maskforge.plot and `maskforge plot`: the figures are written and show what they should (pixels
of each series, the band and the red crosses in the PNG; labels, legend and title as text in the SVG)."""

from __future__ import annotations

import json
import math
import re
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from maskforge.cli import app
from maskforge.errors import MaskforgeError
from maskforge.figures import plot_run
from maskforge.sweeps.figure import NOT_LEARNED_COLOR, plot_sweep
from maskforge.sweeps import COLUMNS, summarize

AXES = ["arch", "init", "scale_fan", "width", "k", "seed"]
BLUE, ORANGE = (31, 119, 180), (255, 127, 14)  # matplotlib's first two cycle colors (the two archs)


def _row(kind: str, status: str = "done", **values) -> dict:
    row = dict.fromkeys(COLUMNS, "")
    row.update(
        kind=kind,
        status=status,
        init="signed_constant",
        scale_fan=True,
        width=1.0,
        data="mnist5k",
        epochs=10,
        batch_size=128,
        lr=0.1 if kind == "search" else 0.001,
        max_steps=None,
        optimizer="sgd" if kind == "search" else "adam",
    )
    row.update(values)
    if status == "done":
        row["learned"] = row["heldout_acc"] >= 0.2
    return row


def _rows() -> list[dict]:
    rows = []
    for arch, base in (("conv4", 0.9), ("fc", 0.6)):
        for k in (0.1, 0.5, 0.9):
            for seed in (0, 1):
                rows.append(_row("search", arch=arch, k=k, seed=seed, heldout_acc=base - abs(k - 0.5) / 4 + seed / 50))
        rows += [_row("dense", arch=arch, seed=seed, heldout_acc=base + 0.05 + seed / 100) for seed in (0, 1)]
    rows[0]["heldout_acc"], rows[0]["learned"] = 0.101, False  # conv4 k 0.1 seed 0 stayed at chance
    rows.append(_row("search", status="failed", arch="fc", k=0.3, seed=0, error="boom"))
    return rows


def _pixels_near(image: np.ndarray, color: tuple[int, int, int], tolerance: int = 12) -> int:
    rgb = (image[..., :3] * 255).round().astype(int)
    return int((np.abs(rgb - np.array(color)).max(axis=-1) <= tolerance).sum())


def _blend(color, alpha: float) -> tuple[int, int, int]:
    return tuple(round(alpha * c + (1 - alpha) * 255) for c in color)


def test_sweep_figure_draws_series_bands_baselines_and_not_learned_points(tmp_path):
    import matplotlib.image

    png, svg = plot_sweep(_rows(), AXES, tmp_path)  # x = k and hue = arch: the axes that vary
    assert png == tmp_path / "accuracy_vs_k_by_arch.png" and svg == tmp_path / "accuracy_vs_k_by_arch.svg"
    image = matplotlib.image.imread(png)
    assert image.shape[0] > 400 and image.shape[1] > 700
    assert _pixels_near(image, BLUE, 30) > 300 and _pixels_near(image, ORANGE, 30) > 300  # the two archs' lines
    assert _pixels_near(image, _blend(BLUE, 0.2), 4) > 500  # conv4's mean +- std band
    assert _pixels_near(image, tuple(int(NOT_LEARNED_COLOR[i : i + 2], 16) for i in (1, 3, 5)), 20) > 20  # the cross
    text = svg.read_text()
    assert _dashed_colors(text) == {"#1f77b4", "#ff7f0e"}  # each arch's dense baseline in its line's color
    for needle in (
        "held-out accuracy (%)",
        "weights kept, k (% of each layer)",
        "arch=conv4",
        "arch=fc",
        "did not learn, not in the mean (1 run)",
        "dense baseline, learned weights (adam lr 0.001, arch=fc)",
        "Edge-popup on mnist5k",
        "1 failed run not shown",
        "mean ± std over 2 seeds",
    ):
        assert needle in text, needle


def _dashed_colors(svg_text: str) -> set[str]:
    """Stroke colors of the dashed lines in a matplotlib SVG (the dense baselines)."""
    styles = re.findall(r'style="([^"]*stroke-dasharray[^"]*)"', svg_text)
    return {re.search(r"stroke: (#[0-9a-f]{6})", style).group(1) for style in styles}


def test_an_axis_that_varies_is_never_averaged_in(tmp_path):
    """hue=arch on rows that also vary in init: init joins the hue, and the title counts seeds per point."""
    rows = [
        _row("search", arch="conv4", k=k, seed=s, init=init, heldout_acc=0.9)
        for init in ("kaiming_normal", "signed_constant")
        for k in (0.1, 0.5)
        for s in range(1 + (init > "l"))
    ]
    png, svg = plot_sweep(rows, AXES, tmp_path, hue=["arch"])
    text = svg.read_text()
    assert "arch=conv4, init=kaiming_normal" in text and "arch=conv4, init=signed_constant" in text
    assert "mean ± std over 1–2 seeds" in text


def test_one_dense_baseline_for_lines_it_does_not_tell_apart_is_black(tmp_path):
    rows = [
        _row("search", arch="conv4", k=k, seed=s, init=init, heldout_acc=0.9 + k / 10)
        for init in ("kaiming_normal", "signed_constant")
        for k in (0.1, 0.5)
        for s in (0, 1)
    ]
    rows += [_row("dense", arch="conv4", seed=s, heldout_acc=0.97) for s in (0, 1)]
    png, svg = plot_sweep(rows, AXES, tmp_path / "new" / "folder")
    assert svg.name == "accuracy_vs_k_by_init.svg"
    assert _dashed_colors(svg.read_text()) == {"#000000"}


def test_width_figure_draws_the_dense_baseline_against_width(tmp_path):
    import matplotlib.image

    rows = [
        _row("search", arch="conv4", k=0.5, seed=s, width=w, heldout_acc=0.8 + w / 20 + s / 100)
        for w in (0.5, 1.0, 2.0)
        for s in (0, 1)
    ]
    rows += [
        _row("dense", arch="conv4", seed=s, width=w, heldout_acc=0.9 + w / 40) for w in (0.5, 1.0, 2.0) for s in (0, 1)
    ]
    png, svg = plot_sweep(rows, AXES, tmp_path, x="width")
    text = svg.read_text()
    assert "width multiplier" in text and "dense baseline" in text and "did not learn" not in text
    assert _pixels_near(matplotlib.image.imread(png), (0, 0, 0), 40) > 300  # the dashed dense line


def test_bad_figure_axes(tmp_path):
    with pytest.raises(MaskforgeError, match="cannot plot by 'colour'"):
        plot_sweep(_rows(), AXES, tmp_path, x="colour")
    with pytest.raises(MaskforgeError, match="cannot be both the x axis and a hue"):
        plot_sweep(_rows(), AXES, tmp_path, x="k", hue=["k"])


def test_summary_leaves_out_points_that_did_not_learn():
    groups = {(g["kind"], g["values"].get("arch"), g["values"].get("k")): g for g in summarize(_rows(), AXES)}
    conv4_low = groups[("search", "conv4", 0.1)]
    assert conv4_low["runs"] == 2 and conv4_low["not_learned"] == 1 and conv4_low["learned"] == 1
    assert conv4_low["mean"] == pytest.approx(0.9 - 0.1 + 1 / 50) and conv4_low["std"] == 0.0
    fc_mid = groups[("search", "fc", 0.5)]
    assert fc_mid["mean"] == pytest.approx(statistics.fmean([0.6, 0.62]))
    assert fc_mid["std"] == pytest.approx(statistics.stdev([0.6, 0.62]))
    assert groups[("search", "fc", 0.3)]["failed"] == 1 and math.isnan(groups[("search", "fc", 0.3)]["mean"])
    assert groups[("dense", "fc", None)]["mean"] == pytest.approx(0.655)


def _write_run(folder: Path, epochs: int = 4) -> None:
    folder.mkdir()
    (folder / "config.json").write_text(
        json.dumps(
            {
                "arch": "conv4",
                "k": 0.3,
                "init": "signed_constant",
                "scale_fan": True,
                "width": 1.0,
                "data": "mnist5k",
                "batch_size": 128,
                "lr": 0.1,
                "seed": 2,
            }
        )
    )
    lines = [
        {
            "epoch": e,
            "step": 31 * e,
            "lr": 0.1 * (1 - e / epochs),
            "train_loss": 2.0 / e,
            "train_acc": 0.2 * e,
            "heldout_loss": 2.2 / e,
            "heldout_acc": 0.2 * e + 0.01,
            "images_per_s": 1000.0,
            "epoch_seconds": 4.0,
        }
        for e in range(1, epochs + 1)
    ]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))


def test_run_curves(tmp_path):
    import matplotlib.image

    _write_run(tmp_path / "run")
    png, svg = plot_run(tmp_path / "run")
    assert png == tmp_path / "run" / "curves.png"
    image = matplotlib.image.imread(png)
    assert image.shape[1] > 3 * image.shape[0] / 2  # three panels side by side
    assert _pixels_near(image, BLUE, 30) > 200 and _pixels_near(image, ORANGE, 30) > 200
    text = svg.read_text()
    for needle in (
        "cross-entropy loss (nats)",
        "accuracy (%)",
        "learning rate at epoch end",
        "epoch",
        "edge-popup, conv4 k=0.3",
        "final held-out accuracy 81.00 %",
    ):
        assert needle in text, needle


def test_run_curves_title_says_the_options_that_are_not_defaults(tmp_path):
    _write_run(tmp_path / "run", epochs=2)
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    (tmp_path / "run" / "config.json").write_text(json.dumps({**config, "width": None, "topk": "global"}))
    text = plot_run(tmp_path / "run")[1].read_text()
    # no "width=None" between scale_fan and topk: an unset width is the architecture's, 1
    assert "edge-popup, conv4 k=0.3 init=signed_constant scale_fan=true topk=global on mnist5k" in text


def test_plot_command(tmp_path):
    _write_run(tmp_path / "run")
    result = CliRunner().invoke(app, ["plot", str(tmp_path / "run"), "--out", str(tmp_path / "fig-k0.5")])
    assert result.exit_code == 0, result.output
    assert result.output.split() == [str(tmp_path / "fig-k0.5.png"), str(tmp_path / "fig-k0.5.svg")]
    assert (tmp_path / "fig-k0.5.png").stat().st_size > 10_000
    missing = CliRunner().invoke(app, ["plot", str(tmp_path)])
    assert missing.exit_code == 2
    assert missing.output.strip().splitlines() == [
        f"error: {tmp_path / 'metrics.jsonl'} does not exist: {tmp_path} is not a run folder, or no epoch has "
        f"finished yet"
    ]


def test_plot_of_a_run_folder_loads_neither_the_search_nor_torch(tmp_path):
    """`maskforge plot RUN` reads two files: it must not import the search (and with it torch)."""
    _write_run(tmp_path / "run", epochs=2)
    code = (
        "import sys, maskforge\n"
        f"paths = maskforge.plot({str(tmp_path / 'run')!r})\n"
        "print(sorted(m for m in ('torch', 'maskforge.searches', 'maskforge.dense', 'maskforge.sweeps') "
        "if m in sys.modules), [p.name for p in paths])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[] ['curves.png', 'curves.svg']"

"""Tests for maskforge.sweeps (maskforge.sweep) and `maskforge sweep`: tiny grids of fc searches (a few steps each) that are
run, skipped, resumed, sharded, collected, extended or refused; every bad input of issue 12."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import maskforge.sweeps.runner as runner_module
from maskforge.artifact import load_artifact
from maskforge.cli import app
from maskforge.data import load_data, normalize
from maskforge.errors import MaskforgeError
from maskforge.searches import SearchConfig, search
from maskforge.sweeps.results import point_row
from maskforge.sweeps import COLUMNS, collect_sweep, make_grid, parse_list, parse_seeds, parse_shard, sweep

FC_LAYERS = [784 * 300, 300 * 100, 100 * 10]  # LeNet 300-100 on the demo's 1x28x28, 10 classes
TINY = {"arch": "fc", "epochs": 1, "max_steps": 3, "batch_size": 64, "device": "cpu"}
cli = CliRunner()


def _name(k: float, seed: int, arch: str = "fc") -> str:
    """The documented folder name of a point (docs/SWEEP.md)."""
    return f"arch={arch},init=signed_constant,scale_fan=false,width=1.0,topk=layer,k={k},seed={seed}"


def _csv(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def _without_timing(rows: list[dict]) -> list[dict]:
    return [{key: value for key, value in row.items() if key != "wall_s"} for row in rows]


def _heldout_accuracy(artifact_path: Path) -> float:
    """Independent check: the artifact's network classifies the demo's held-out split."""
    model = load_artifact(artifact_path).create_model()
    splits = load_data("mnist5k")
    images = torch.stack([splits.heldout[i][0] for i in range(len(splits.heldout))])
    labels = torch.tensor([int(splits.heldout[i][1]) for i in range(len(splits.heldout))])
    with torch.no_grad():
        predicted = model(normalize(images, splits.spec)).argmax(1)
    return float((predicted == labels).double().mean())


@pytest.fixture(scope="module")
def done_sweep(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sweep") / "grid"
    result = sweep(out, {**TINY, "k": [0.3, 0.5], "seed": [0, 1]}, dense_baseline=True, figures=False)
    assert result.ok and len(result.ran) == 6 and not result.skipped
    return out


def test_every_point_is_a_run_folder_and_a_row(done_sweep):
    rows = _csv(done_sweep / "results.csv")
    assert list(rows[0]) == COLUMNS
    names = [_name(k, s) for k in (0.3, 0.5) for s in (0, 1)] + [f"dense,arch=fc,width=1.0,seed={s}" for s in (0, 1)]
    assert [row["point"] for row in rows] == names
    for row in rows[:4]:
        folder = done_sweep / row["point"]
        config = json.loads((folder / "config.json").read_text())
        assert config["k"] == float(row["k"]) and config["seed"] == int(row["seed"]) and config["max_steps"] == 3
        assert row["status"] == "done" and row["kind"] == "search" and row["optimizer"] == "sgd"
        artifact = folder / "artifact.safetensors"
        assert int(row["artifact_bytes"]) == artifact.stat().st_size
        k = float(row["k"])
        assert int(row["kept_weights"]) == sum(max(1, round(k * n)) for n in FC_LAYERS)
        assert int(row["masked_weights"]) == sum(FC_LAYERS)
        accuracy = _heldout_accuracy(artifact)
        assert math.isclose(float(row["heldout_acc"]), accuracy, abs_tol=1e-9)
        metrics = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
        assert float(row["best_heldout_acc"]) == max(m["heldout_acc"] for m in metrics)
        assert int(row["epochs_done"]) == 1 and int(row["steps"]) == 3
        assert row["learned"] == ("true" if accuracy >= 0.2 else "false")  # ten classes: twice chance
        assert float(row["wall_s"]) > 0
    for row in rows[4:]:
        assert row["kind"] == "dense" and row["status"] == "done" and row["k"] == "" and row["optimizer"] == "adam"
        assert int(row["kept_weights"]) == int(row["masked_weights"]) == sum(FC_LAYERS)
        assert row["artifact_bytes"] == ""


def test_a_point_is_the_search_with_the_same_arguments(done_sweep, tmp_path):
    single = search(SearchConfig(**TINY, k=0.5, seed=1, out=str(tmp_path / "single")))
    assert single.artifact_path.read_bytes() == (done_sweep / _name(0.5, 1) / "artifact.safetensors").read_bytes()


def test_rerun_skips_finished_points(done_sweep, monkeypatch):
    # A finished search removes its checkpoint: only the artifact says the point is done.
    assert not list(done_sweep.glob("*/checkpoint.safetensors"))
    before = {p: p.stat().st_mtime_ns for p in done_sweep.glob("*/artifact.safetensors")}
    rows_before = _csv(done_sweep / "results.csv")
    monkeypatch.setattr(runner_module, "search", lambda *a, **k: pytest.fail("a finished point ran again"))
    monkeypatch.setattr(runner_module, "train_dense", lambda *a, **k: pytest.fail("a finished baseline ran again"))
    result = sweep(done_sweep, {**TINY, "k": [0.3, 0.5], "seed": [0, 1]}, dense_baseline=True, figures=False)
    assert result.ran == [] and len(result.skipped) == 6
    assert {p: p.stat().st_mtime_ns for p in done_sweep.glob("*/artifact.safetensors")} == before
    assert _csv(done_sweep / "results.csv") == rows_before


def test_interrupted_point_resumes_and_ends_as_the_uninterrupted_run(tmp_path, monkeypatch):
    out = tmp_path / "sweep"
    options = {**TINY, "max_steps": None, "epochs": 2, "batch_size": 1000, "k": [0.5], "seed": [0]}

    def interrupt(record):
        raise KeyboardInterrupt  # a kill right after the first epoch's checkpoint

    point = make_grid(options).search_points(out)[0]
    with pytest.raises(KeyboardInterrupt):
        search(point.config, on_epoch=interrupt)
    assert point_row(point, out)["status"] == "interrupted"
    steps = []
    result = sweep(out, options, figures=False, on_step=lambda progress: steps.append(progress.step))
    assert steps == [5, 6, 7, 8] and result.ok  # the second epoch only: continued from the first's checkpoint
    uninterrupted = search(SearchConfig(**{**options, "k": 0.5, "seed": 0}, out=str(tmp_path / "whole")))
    assert (out / _name(0.5, 0) / "artifact.safetensors").read_bytes() == uninterrupted.artifact_path.read_bytes()


def test_interrupted_point_without_checkpoint_starts_over(tmp_path, monkeypatch):
    """Killed before its first checkpoint (config.json and metrics, no checkpoint): nothing to resume, so the
    point runs again from the start and ends as the uninterrupted search."""
    out = tmp_path / "sweep"
    options = {**TINY, "max_steps": None, "epochs": 2, "batch_size": 1000, "k": [0.5], "seed": [0]}
    point = make_grid(options).search_points(out)[0]

    def interrupt(record):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        search(point.config, on_epoch=interrupt)
    folder = out / point.name
    (folder / "checkpoint.safetensors").unlink()
    assert (folder / "config.json").is_file() and (folder / "metrics.jsonl").is_file()
    assert point_row(point, out)["status"] == "interrupted"
    steps = []
    result = sweep(out, options, figures=False, on_step=lambda progress: steps.append(progress.step))
    assert steps == list(range(1, 9))  # nothing to continue from: both epochs, from the first step
    assert result.ran == [point.name] and result.ok
    uninterrupted = search(SearchConfig(**{**options, "k": 0.5, "seed": 0}, out=str(tmp_path / "whole")))
    assert (folder / "artifact.safetensors").read_bytes() == uninterrupted.artifact_path.read_bytes()
    assert (folder / "metrics.jsonl").read_text().count("\n") == 2


def test_a_stopped_sweep_finishes_without_redoing_points(tmp_path):
    out = tmp_path / "sweep"
    options = {**TINY, "k": [0.3, 0.5], "seed": [0, 1]}
    started = []

    def stop_at_third(event, point, info):
        if event == "start":
            started.append(point.name)
            if len(started) == 3:
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        sweep(out, options, on_point=stop_at_third, figures=False)
    steps = []
    result = sweep(out, options, figures=False, on_step=lambda step: steps.append((step.step, step.total_steps)))
    assert result.skipped == started[:2] and result.ran == [_name(0.5, 0), _name(0.5, 1)]
    assert steps == [(1, 3), (2, 3), (3, 3)] * 2  # each point run reports its steps


def test_sigterm_during_a_sweep_says_how_to_continue_and_the_same_command_does(tmp_path, monkeypatch):
    """SIGTERM (what Slurm sends) during the second point: that search checkpoints, the command says where
    and how to go on and exits 143; the same command again skips the first point and resumes the second."""
    import os
    import signal

    real_search, calls = runner_module.search, []

    def search_then_sigterm(config, **kwargs):
        calls.append(config.out)
        on_step = kwargs.pop("on_step", None)

        def step(progress):
            if on_step:
                on_step(progress)
            if len(calls) == 2 and progress.step == 2:
                os.kill(os.getpid(), signal.SIGTERM)

        return real_search(config, on_step=step, **kwargs)

    monkeypatch.setattr(runner_module, "search", search_then_sigterm)
    command = [
        "sweep",
        "--out",
        str(tmp_path / "sweep"),
        "--arch",
        "fc",
        "--k",
        "0.3,0.5",
        "--epochs",
        "1",
        "--max-steps",
        "3",
        "--batch-size",
        "64",
        "--device",
        "cpu",
        "--quiet",
        "--no-figure",
    ]
    stopped = cli.invoke(app, command)
    assert stopped.exit_code == 143, stopped.output
    second = tmp_path / "sweep" / _name(0.5, 0)
    assert f"at step 2 of 3: checkpoint saved in {second}" in stopped.stderr
    assert "run the same command again to continue" in stopped.stderr
    assert not [line for line in stopped.stderr.splitlines() if line.startswith("search fc")]  # --quiet: no start lines
    assert (second / "checkpoint.safetensors").is_file()
    steps = []

    def recording(config, **kwargs):
        on_step = kwargs.pop("on_step", None)

        def step(progress):
            steps.append(progress.step)
            if on_step:
                on_step(progress)

        return real_search(config, on_step=step, **kwargs)

    monkeypatch.setattr(runner_module, "search", recording)
    again = cli.invoke(app, command)
    assert steps == [3]  # the first point skipped, the second continued from its step-2 checkpoint
    assert again.exit_code == 0, again.output
    assert "finished earlier: skipped" in again.stdout and (second / "artifact.safetensors").is_file()


def test_shards_then_collect_equal_the_unsharded_sweep(tmp_path):
    options = {**TINY, "k": [0.3, 0.5, 0.7], "seed": [0, 1]}
    whole = sweep(tmp_path / "whole", options, dense_baseline=True, figures=False)
    first = sweep(tmp_path / "sharded", options, dense_baseline=True, shard=(0, 2), figures=False)
    second = sweep(tmp_path / "sharded", options, dense_baseline=True, shard=(1, 2), figures=False)
    points = [p.name for p in make_grid(options, dense_baseline=True).points(tmp_path)]
    assert first.ran == points[0::2] and second.ran == points[1::2]
    assert {row["status"] for row in first.rows} == {"done", "pending"}
    collect_sweep(tmp_path / "sharded", figures=False)
    assert _without_timing(_csv(tmp_path / "sharded" / "results.csv")) == _without_timing(
        _csv(tmp_path / "whole" / "results.csv")
    )
    assert whole.ok and len(whole.rows) == 8


def _fail_some(monkeypatch, when, error: Exception):
    """Make the sweep's searches raise `error` for the points `when(config)` selects; returns the real search."""
    real_search = runner_module.search

    def flaky(config, **kwargs):
        if when(config):
            raise error
        return real_search(config, **kwargs)

    monkeypatch.setattr(runner_module, "search", flaky)
    return real_search


def test_failing_point_does_not_stop_the_sweep(tmp_path, monkeypatch):
    out = tmp_path / "sweep"
    options = {**TINY, "k": [0.3, 0.5], "seed": [0]}
    real_search = _fail_some(monkeypatch, lambda config: config.k == 0.3, MaskforgeError("data set exploded"))
    result = sweep(out, options, figures=False)
    assert result.failed == [_name(0.3, 0)] and result.ran == [_name(0.5, 0)] and not result.ok
    rows = {row["point"]: row for row in _csv(out / "results.csv")}
    assert rows[_name(0.3, 0)]["status"] == "failed" and rows[_name(0.3, 0)]["error"] == "data set exploded"
    assert rows[_name(0.5, 0)]["status"] == "done"
    monkeypatch.setattr(runner_module, "search", real_search)
    again = sweep(out, options, figures=False)  # the failed point is retried; the finished one kept
    assert again.ran == [_name(0.3, 0)] and again.skipped == [_name(0.5, 0)] and again.ok
    assert json.loads((out / _name(0.3, 0) / "point.json").read_text())["attempts"] == 2


def test_extending_a_sweep_adds_points_and_other_fixed_options_are_refused(tmp_path):
    out = tmp_path / "sweep"
    sweep(out, {**TINY, "k": [0.5], "seed": [0]}, figures=False)
    extended = sweep(out, {**TINY, "k": [0.5, 0.3], "seed": [0]}, figures=False)
    assert extended.skipped == [_name(0.5, 0)] and extended.ran == [_name(0.3, 0)]
    assert len(json.loads((out / "sweep.json").read_text())["grids"]) == 2
    recorded = (out / "sweep.json").read_bytes()
    with pytest.raises(MaskforgeError, match=r"other fixed options: max_steps 3 \(this grid: 4\)"):
        sweep(out, {**TINY, "max_steps": 4, "k": [0.5], "seed": [0]}, figures=False)
    with pytest.raises(MaskforgeError, match="this grid varies arch, init, scale_fan, width, topk, lr, k, seed"):
        sweep(out, {**TINY, "lr": [0.1, 0.05], "k": [0.5], "seed": [0]}, figures=False)
    assert (out / "sweep.json").read_bytes() == recorded  # nothing recorded, nothing finished lost
    assert {row["status"] for row in collect_sweep(out, figures=False).rows} == {"done"}
    older = json.loads(recorded)
    (out / "sweep.json").write_text(json.dumps({**older, "version": 1}))
    with pytest.raises(MaskforgeError) as info:
        collect_sweep(out, figures=False)
    assert str(info.value) == (
        f"{out / 'sweep.json'}: written by an older maskforge (sweep format 1, whose folder "
        f"names do not say topk); run the sweep again in a new folder"
    )


# ---------------------------------------------------------------------------------------------------------
# Bad input: one clear error each
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,text,message",
    [
        ("k", "", "k: malformed list ''"),
        ("k", "0.1,,0.3", "k: malformed list '0.1,,0.3'"),
        ("k", "0.1,", "k: malformed list"),
        ("k", "a", "k: 'a' is not a number"),
        ("k", "0.1,0.1", "k: value(s) 0.1 listed twice"),
        ("epochs", "2.5", "epochs: '2.5' is not an integer"),
        ("scale_fan", "maybe", "scale_fan: 'maybe' is not true/false"),
        ("colour", "red", "unknown search option"),
    ],
)
def test_malformed_lists(name, text, message):
    with pytest.raises(MaskforgeError) as info:
        parse_list(name, text)
    assert str(info.value).startswith(message)


def test_learned_threshold():
    from maskforge.sweeps import learned_threshold

    assert learned_threshold(10) == pytest.approx(0.2) and learned_threshold(1000) == pytest.approx(0.002)
    assert learned_threshold(2) == pytest.approx(0.625) and learned_threshold(1) == pytest.approx(1.0)


def test_seeds_and_shards():
    assert parse_seeds("3") == [0, 1, 2] and parse_seeds("0,5,9") == [0, 5, 9] and parse_seeds("7:10") == [7, 8, 9]
    for text, message in [
        ("0", "seeds: the count must be at least 1"),
        ("3:3", "seeds: the range 3:3 is empty"),
        ("x", "seeds: 'x' is neither"),
        ("1,1", "seed: value(s) 1 listed twice"),
    ]:
        with pytest.raises(MaskforgeError) as info:
            parse_seeds(text)
        assert str(info.value).startswith(message)
    assert parse_shard("1/3") == (1, 3)
    for text in ("2/2", "1/0", "3", "-1/2", "a/b"):
        with pytest.raises(MaskforgeError, match="^shard"):
            parse_shard(text)


@pytest.mark.parametrize(
    "options,message",
    [
        (
            {"k": [0.5, 1.5]},
            "grid point arch=fc,init=signed_constant,scale_fan=false,width=1.0,topk=layer,k=1.5,seed=0: "
            "search config: k must be <= 1, got 1.5",
        ),
        ({"k": [0.0]}, "search config: k must be > 0, got 0.0"),
        ({"width": [0, 1]}, "search config: width must be > 0, got 0.0"),
        ({"width": [65]}, "search config: width must be <= 64, got 65.0"),
        ({"arch": ["fc", "resnet18"], "width": [2]}, "architecture resnet18 has fixed widths"),
        (
            {"arch": ["vgg"]},
            "grid point arch=vgg,init=signed_constant,scale_fan=false,width=1.0,topk=layer,k=0.5,seed=0: "
            "unknown architecture 'vgg'",
        ),
        ({"topk": ["layer", "row"]}, "search config: topk must be one of 'layer' or 'global', got 'row'"),
        ({"k": []}, "k: the list of values is empty"),
        ({"out": "x"}, "unknown sweep option(s) ['out']"),
        ({"k": ["0.5"]}, "search config: k must be a number, got '0.5'"),
    ],
)
def test_bad_grids_are_refused_before_anything_runs(tmp_path, options, message):
    with pytest.raises(MaskforgeError) as info:
        sweep(tmp_path / "sweep", {**TINY, **options}, figures=False)
    assert message in str(info.value)
    assert not (tmp_path / "sweep").exists()


# ---------------------------------------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------------------------------------


def _cli(*args: str):
    return cli.invoke(app, ["sweep", *args])


def test_cli_sweep_collect_and_summary(tmp_path):
    out = tmp_path / "sweep"
    common = [
        "--arch",
        "fc",
        "--k",
        "0.3,0.5",
        "--seeds",
        "2",
        "--max-steps",
        "3",
        "--epochs",
        "1",
        "--device",
        "cpu",
        "--no-figure",
        "--quiet",
    ]
    result = _cli("--out", str(out), *common)
    assert result.exit_code == 0, result.output
    rows = _csv(out / "results.csv")
    assert [row["point"] for row in rows] == [_name(k, s) for k in (0.3, 0.5) for s in (0, 1)]
    assert "[4/4]" in result.output and "mean ± std" in result.output
    again = _cli("--out", str(out), *common)
    assert again.exit_code == 0 and again.output.count("finished earlier: skipped") == 4
    collected = _cli("--collect", str(out), "--no-figure")
    assert collected.exit_code == 0 and _without_timing(_csv(out / "results.csv")) == _without_timing(rows)


def test_cli_sweep_in_a_log_file_shows_each_points_epochs(tmp_path):
    """Outside a terminal (nohup, Slurm, CI) a sweep prints each point's epochs as `search` does, so a log is
    never silent for a whole point; --quiet keeps only the points' results."""
    common = [
        "--arch",
        "fc",
        "--k",
        "0.3,0.5",
        "--epochs",
        "2",
        "--batch-size",
        "1000",
        "--device",
        "cpu",
        "--no-figure",
        "--dense-baseline",
    ]
    result = _cli("--out", str(tmp_path / "loud"), *common)
    assert result.exit_code == 0, result.output
    epoch_lines = [line for line in result.stderr.splitlines() if line.startswith("epoch ")]
    assert [line.split(":")[0] for line in epoch_lines] == ["epoch 1/2", "epoch 2/2"] * 3  # 2 searches + dense
    quiet = _cli("--out", str(tmp_path / "quiet"), *common, "--quiet")
    assert quiet.exit_code == 0 and not [line for line in quiet.stderr.splitlines() if line.startswith("epoch ")]
    assert quiet.stdout.count("done in") == 3


@pytest.mark.parametrize(
    "args,message",
    [
        (["--k", "0.1,,0.3"], "error: k: malformed list '0.1,,0.3'"),
        (
            ["--k", "1.5"],
            "error: --k 1.5: k is the fraction of weights kept, in (0, 1] (--k 0.3 keeps 30 % of every layer)",
        ),
        (["--width", "0"], "search config: width must be > 0, got 0.0"),
        (["--topk", "global,row"], "search config: topk must be one of 'layer' or 'global', got 'row'"),
        (["--shard", "2/2"], "error: shard 2/2: I must be in 0..N-1"),
        (["--seeds", "0"], "error: seeds: the count must be at least 1"),
        (["--hue", "colour", "--collect", "nowhere"], "error: nowhere is not a sweep folder"),
        (
            ["--collect", "nowhere", "--k", "0.1", "--seeds", "3"],
            "error: --collect runs nothing, so --k, --seeds do not apply",
        ),
        (
            ["--x", "colour"],
            "error: cannot plot by 'colour': the sweep's axes are arch, init, scale_fan, width, topk, k, seed",
        ),
    ],
)
def test_cli_bad_input_is_one_error_line(tmp_path, args, message):
    out = tmp_path / "sweep"
    result = (
        _cli("--out", str(out), "--arch", "fc", "--max-steps", "1", *args) if "--collect" not in args else _cli(*args)
    )
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.output
    assert not out.exists()


def test_cli_sweep_options_are_the_search_options():
    """Every search option (but --out and --seed) is a sweep option taking a comma list, with the search's help
    (tests/test_cli.py checks that `maskforge sweep --help` imports no torch)."""
    from dataclasses import fields

    output = cli.invoke(app, ["sweep", "--help"], env={"COLUMNS": "300"}).output
    listed = {line.split()[1]: " ".join(line.split()[2:-1]) for line in output.splitlines() if line.startswith("│ --")}
    for field in fields(SearchConfig):
        if field.name not in ("out", "seed"):
            description = SearchConfig.__pydantic_fields__[field.name].description
            assert listed["--" + field.name.replace("_", "-")].startswith(f"LIST {description[:30]}"), field.name
    assert "--seed" not in listed and listed["--seeds"].startswith("SEEDS Seeds: a count")
    assert listed["--topk"] == (
        "LIST Top-k rule: layer (k in every layer, the paper's) or global (one threshold over "
        "all layers, each keeps at least 1). [a comma list; default layer]"
    )
    assert listed["--scale-fan"].endswith("[on or off (also true/false, yes/no, 1/0); both: on,off; default false]")
    assert listed["--width"].endswith("(default: the architecture's, 1). [a comma list]")


def test_cli_failing_point_exits_non_zero_after_the_others(tmp_path, monkeypatch):
    _fail_some(monkeypatch, lambda config: config.seed == 0, RuntimeError("kaboom"))
    out = tmp_path / "sweep"
    result = _cli(
        "--out", str(out), "--arch", "fc", "--seeds", "2", "--max-steps", "2", "--epochs", "1", "--no-figure", "-q"
    )
    assert result.exit_code == 1  # an unexpected error in a point is a bug: exit 1, after every point ran
    assert (out / _name(0.5, 1) / "artifact.safetensors").is_file()
    last = result.output.strip().splitlines()[-1]
    assert last.startswith("error: 1 of 2 sweep points failed") and "kaboom" in last


def test_topk_and_width_are_axes_end_to_end(tmp_path):
    """`--topk layer,global --width 0.5,1`: four points, each an ordinary search whose artifact records its
    rule and width; the kept counts follow docs/FORMAT.md 3.3 (per layer, or one K over all layers)."""
    out = tmp_path / "sweep"
    result = _cli(
        "--out",
        str(out),
        "--arch",
        "fc",
        "--topk",
        "layer,global",
        "--width",
        "0.5,1",
        "--k",
        "0.3",
        "--max-steps",
        "2",
        "--epochs",
        "1",
        "--device",
        "cpu",
        "--no-figure",
        "-q",
    )
    assert result.exit_code == 0, result.output
    rows = {(row["width"], row["topk"]): row for row in _csv(out / "results.csv")}
    assert set(rows) == {("0.5", "layer"), ("0.5", "global"), ("1.0", "layer"), ("1.0", "global")}
    layers = {"0.5": [784 * 150, 150 * 50, 50 * 10], "1.0": FC_LAYERS}
    for (width, topk), row in rows.items():
        artifact = load_artifact(out / row["point"] / "artifact.safetensors")
        assert artifact.topk == topk and artifact.arch_args.get("width", 1.0) == float(width)
        sizes = layers[width]
        assert int(row["masked_weights"]) == artifact.masked_weights == sum(sizes)
        kept = [max(1, round(0.3 * n)) for n in sizes] if topk == "layer" else None
        total = sum(kept) if kept else max(len(sizes), max(1, round(0.3 * sum(sizes))))
        assert int(row["kept_weights"]) == artifact.kept_weights == total, (width, topk)


def test_where_selects_the_points_a_figure_shows(done_sweep, monkeypatch):
    import maskforge.sweeps.runner

    drawn = []
    monkeypatch.setattr(
        maskforge.sweeps.runner, "plot_sweep", lambda rows, *a, **k: drawn.append(rows) or [Path("f.png")]
    )
    result = collect_sweep(done_sweep, where={"k": [0.5], "seed": [1]})
    assert [row["point"] for row in drawn[0]] == [_name(0.5, 1), "dense,arch=fc,width=1.0,seed=1"]
    assert len(result.rows) == 6 and len(_csv(done_sweep / "results.csv")) == 6  # the table keeps every point
    nothing = collect_sweep(done_sweep, where={"k": [0.9]})
    assert nothing.figures == [] and nothing.figure_note == "no figure: no finished point matches the selection"
    bad = cli.invoke(app, ["plot", str(done_sweep), "--where", "colour=red"])
    assert bad.exit_code == 2 and bad.output.strip() == "error: unknown search option 'colour'"
    none = cli.invoke(app, ["plot", str(done_sweep), "--where", "k=0.9"])
    assert none.exit_code == 2 and none.output.strip().endswith("no figure: no finished point matches the selection")

"""Output that reads well outside a terminal and in `--help`, hints for first-time mistakes, one estimate
of the time left, and usage errors answered before torch loads (issue 17, sections 1 and 2).

Typer's CliRunner captures output in a buffer, which is not a terminal: what it shows is what a log file,
nohup, CI or `> file` gets. COLUMNS is removed so that rich has no width to fit.
"""

from __future__ import annotations

import logging
import math
import subprocess
import sys
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

from maskforge.cli import app

NO_WIDTH = {"COLUMNS": None, "LINES": None}


def _invoke(*args: str):
    return CliRunner().invoke(app, list(args), env=NO_WIDTH)


def _help_text(output: str) -> str:
    """The help page's words in order, without the panel's frame and the column padding."""
    return " ".join(output.replace("│", " ").replace("╭", " ").replace("╰", " ").split())


# --- section 1: help pages --------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["search", "sweep"])
def test_help_in_a_file_keeps_the_install_extra_and_shows_no_bool_placeholder(command):
    import importlib

    importlib.import_module(f"maskforge.cli.{command}_cmd")  # imported already (as by another test): the
    # group builds the command from its registration, without loading it
    result = _invoke(command, "--help")
    assert result.exit_code == 0, result.output
    assert "pip install 'maskforge[tensorboard]'" in _help_text(result.stdout)  # not eaten as rich markup
    assert "<bool>" not in result.stdout  # --help, --quiet, --json ... take no value


def test_help_in_a_file_has_a_readable_description_column():
    """Off a terminal the page is 120 columns wide, not 80: a short description fits on its flag's line,
    and the docstring's paragraphs flow instead of breaking where the source lines did."""
    lines = _invoke("search", "--help").stdout.splitlines()
    k_line = next(line for line in lines if line.startswith("│ --k "))
    assert "Fraction of weights KEPT in every layer, in (0, 1]." in k_line, k_line
    assert any("The artifact stores the seed, one bit" in line for line in lines), lines[:12]
    assert max(len(line) for line in lines) == 120
    root = _invoke("--help")
    assert root.exit_code == 0 and "<bool>" not in root.stdout
    assert any(
        "Search a subnetwork of a seeded random network with edge-popup and save it as an artifact." in line
        for line in root.stdout.splitlines()
    )


def test_reflow_joins_paragraph_lines_but_keeps_indented_examples():
    from maskforge.cli.app import reflow

    text = "Title line.\n\nOne paragraph\nover two lines.\n\nExample:\n\n  maskforge x --a 1\n    --b 2\n"
    assert reflow(text) == "Title line.\n\nOne paragraph over two lines.\n\nExample:\n\n  maskforge x --a 1\n    --b 2"


# --- section 1: tables and long lines in a file -----------------------------------------------------------


def test_a_table_in_a_file_keeps_one_row_per_line():
    from maskforge.registry import list_archs

    result = _invoke("archs")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    for entry in list_archs():
        [row] = [line for line in lines if line.startswith(f"│ {entry['name']} ")]
        assert entry["description"] in row and f"{entry['weights_imagenet']:,}" in row, row
    assert len([line for line in lines if line.startswith("│")]) == len(list_archs())  # no wrapped cells


def test_the_console_wraps_nothing_off_a_terminal_and_fits_columns_when_set(monkeypatch, capsys):
    from maskforge.cli.console import console

    sentence = "wrote runs/conv4/artifact.int8.onnx: " + "a long one-line summary, " * 12
    monkeypatch.delenv("COLUMNS", raising=False)
    console().print(sentence)
    assert capsys.readouterr().out == sentence + "\n"
    monkeypatch.setenv("COLUMNS", "60")
    console().print(sentence)
    assert max(len(line) for line in capsys.readouterr().out.splitlines()) <= 60


def test_a_sweep_of_one_seed_says_n_1_not_a_zero_spread(tmp_path, monkeypatch):
    from maskforge.cli.console import console
    from maskforge.cli.sweep_cmd import _print_summary

    monkeypatch.delenv("COLUMNS", raising=False)
    group = {
        "kind": "search",
        "values": {"arch": "conv4", "k": 0.5},
        "runs": 1,
        "done": 1,
        "learned": 1,
        "not_learned": 0,
        "failed": 0,
        "mean": 0.847,
        "std": 0.0,
        "wall_s": 12.0,
    }
    two = {
        **group,
        "values": {"arch": "conv4", "k": 0.3},
        "runs": 2,
        "done": 2,
        "learned": 2,
        "mean": 0.85,
        "std": 0.01,
    }
    result = SimpleNamespace(
        axes=["arch", "k", "seed"], summary=[group, two], out=tmp_path, figures=[], figure_note=None
    )
    printed = console()
    with printed.capture() as captured:
        _print_summary(printed, result)
    lines = captured.get().splitlines()
    assert lines[0] == f"{tmp_path}: final held-out accuracy (%), mean ± std over the seeds that learned"  # one line
    rows = {line.split("│")[2].strip(): line for line in lines if line.startswith("│ search")}
    assert "84.70 (n=1)" in rows["0.5"] and "±" not in rows["0.5"], rows
    assert "85.00 ± 1.00" in rows["0.3"], rows


def test_a_closed_pipe_ends_the_command_quietly(monkeypatch):
    """`maskforge ... | head`: the reader went away; not a bug, no traceback, the shell's exit status 141."""

    def closed(*args, **kwargs):
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr("maskforge.cli.archs_cmd.list_archs", closed)
    result = _invoke("archs", "--json")
    assert (result.exit_code, result.stdout, result.stderr) == (141, "", "")


# --- section 1: messages for what the user typed ----------------------------------------------------------


@pytest.mark.parametrize(
    "args,message",
    [
        (
            ["--k", "30"],
            "error: Invalid value for '--k': k is the fraction of weights kept, in (0, 1] (--k 0.3 keeps "
            "30 % of every layer); did you mean --k 0.3?",
        ),
        (
            ["--k", "0.3,0.5"],
            "error: Invalid value for '--k': '0.3,0.5' is a list, but one search takes one value; "
            "`maskforge sweep --k 0.3,0.5` runs one search per value",
        ),
        (
            ["--epochs", "5,10"],
            "error: Invalid value for '--epochs': '5,10' is a list, but one search takes one value; "
            "`maskforge sweep --epochs 5,10` runs one search per value",
        ),
        (["--lr", "fast"], "error: Invalid value for '--lr': 'fast' is not a valid number"),
        (
            ["--init", "gaussian"],
            "error: --init must be one of 'signed_constant', 'unsigned_constant' or 'kaiming_normal', got 'gaussian'",
        ),
    ],
)
def test_search_usage_errors_name_flags_and_hint(args, message, tmp_path):
    result = _invoke("search", *args, "--out", str(tmp_path / "run"))
    assert (result.exit_code, result.stderr.splitlines()) == (2, [message]), result.output
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("typed", ["wrn-50", "WRN50", "Wrn_50"])
def test_an_arch_name_spelled_otherwise_gets_did_you_mean(typed):
    from maskforge.errors import MaskforgeError
    from maskforge.registry import ARCHS, get_arch

    with pytest.raises(MaskforgeError) as caught:
        get_arch(typed)
    assert str(caught.value) == (
        f"unknown architecture {typed!r} (did you mean 'wrn50'?); choose from: {', '.join(ARCHS)}"
    )


def test_no_guess_when_nothing_is_close_or_two_are_equally_close():
    from maskforge.registry import closest_arch

    assert closest_arch("vgg16") is None and closest_arch("conv5") is None  # conv4 or conv6?
    assert closest_arch("resnet-18") == "resnet18" and closest_arch("rsnet50") == "resnet50"


def test_the_large_network_warning_names_flags(tmp_path):
    from maskforge.searches import notices

    from maskforge.schema import SearchConfig

    unbounded, bounded = (notices.cpu_advice(SearchConfig(max_steps=steps)) for steps in (None, 600))
    assert "--device cuda" in unbounded and "bound the search with --max-steps" in unbounded
    assert "a smaller --max-steps" in bounded and "bound the search" not in bounded  # it is bounded already
    assert "max_steps" not in unbounded + bounded


def test_a_sweep_k_given_as_a_percentage_gets_the_same_hint_as_search(tmp_path):
    result = _invoke("sweep", "--k", "0.1,30", "--out", str(tmp_path / "sweep"))
    assert result.exit_code == 2 and not (tmp_path / "sweep").exists()
    assert result.stderr.strip() == (
        "error: --k 0.1,30: 30: k is the fraction of weights kept, in (0, 1] (--k 0.3 keeps 30 % of every "
        "layer); did you mean --k 0.3?"
    )


# --- section 2: usage errors before torch -----------------------------------------------------------------

_NO_TORCH_YET = """
import sys
from maskforge.cli import main
sys.argv = ["maskforge"] + sys.argv[1:]
try:
    main()
except SystemExit as exc:
    print(exc.code, "torch" in sys.modules)
"""


@pytest.mark.parametrize(
    "args",
    [
        ["search", "--k", "2"],
        ["search", "--batch-size", "0"],
        ["search", "--resume", "x", "--overwrite"],
        ["search", "--k", "0.3,0.5"],
        ["sweep", "--k", "0.1,30", "--out", "x"],
        ["export", "x.safetensors", "--precision", "int4"],
        ["export", "x.safetensors", "--storage", "packed"],
        ["export", "x.safetensors", "--opset", "3"],
        ["export", "x.safetensors", "--format", "tf"],
        ["export", "x.safetensors", "--format", "torch", "--precision", "int8"],
        ["eval", "x.safetensors", "--compare", "--size", "28"],
        ["verify", "--nope"],
        ["predict"],
        ["plot", "--nope"],
        ["inspect"],
    ],
)
def test_a_usage_error_is_answered_before_torch_loads(args):
    """What makes `maskforge search --k 2` answer in about half a second instead of 4-6 (timed by hand: a
    test asserts no time)."""
    done = subprocess.run([sys.executable, "-c", _NO_TORCH_YET, *args], capture_output=True, text=True, timeout=120)
    assert done.stdout.split() == ["2", "False"], (done.stdout, done.stderr)
    assert done.stderr.startswith("error: "), done.stderr


# --- section 2: one estimate of the time left -------------------------------------------------------------


class _FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _session(total_steps: int, steps_per_epoch: int, heldout: int = 1000, batch_size: int = 100):
    position = SimpleNamespace(step=0, epoch=0, batch_in_epoch=0)
    return SimpleNamespace(
        position=position,
        total_steps=total_steps,
        steps_per_epoch=steps_per_epoch,
        splits=SimpleNamespace(heldout=[None] * heldout),
        config=SimpleNamespace(batch_size=batch_size),
        accelerator=SimpleNamespace(device=SimpleNamespace(type="cpu")),
    )


def _take_step(session, clock, seconds: float, epoch_end_seconds: float = 0.0) -> None:
    clock.now += seconds
    session.position.step += 1
    session.position.batch_in_epoch += 1
    if session.position.batch_in_epoch == session.steps_per_epoch:  # end_epoch: the evaluation runs
        clock.now += epoch_end_seconds
        session.position.epoch += 1
        session.position.batch_in_epoch = 0


def test_the_estimate_comes_after_two_timed_steps_and_counts_the_real_evaluations(monkeypatch, caplog):
    from maskforge.searches import notices

    clock = _FakeClock()
    monkeypatch.setattr(notices.time, "perf_counter", clock)
    session = _session(total_steps=12, steps_per_epoch=4)
    watch = notices.CostWatch(session, warned=True)
    etas = []
    with caplog.at_level(logging.INFO, logger="maskforge"):
        for index in range(12):
            # the first step pays one-off costs (60 s); then 2 s a step; each evaluation takes 30 s
            _take_step(session, clock, 60.0 if index == 0 else 2.0, epoch_end_seconds=30.0)
            etas.append(watch.after_step())
    assert etas[:2] == [None, None]  # step 1 is not timed, step 2 is the first timed one
    # step 3: 2 s a step, 9 steps and 3 evaluations left; none has run: a third of a step per held-out image
    assert etas[2] == pytest.approx(9 * 2.0 + 3 * (1000 / 100 * 2.0 / 3))
    # step 5 follows the first evaluation, which took 30 s: that is the figure from then on
    assert etas[4] == pytest.approx(7 * 2.0 + 2 * 30.0)
    assert etas[8] == pytest.approx(3 * 2.0 + 1 * 30.0)
    assert etas[11] == pytest.approx(0.0)
    [line] = [r.getMessage() for r in caplog.records if r.getMessage().startswith("estimated time")]
    assert line == (
        f"estimated time: about {notices.format_duration(etas[2])} for the remaining 9 steps (2 s per "
        f"step on cpu, held-out evaluations included)"
    )


def test_a_resumed_search_times_from_its_own_second_step(monkeypatch):
    from maskforge.searches import notices

    clock = _FakeClock()
    monkeypatch.setattr(notices.time, "perf_counter", clock)
    session = _session(total_steps=20, steps_per_epoch=10)
    session.position.step, session.position.batch_in_epoch = 13, 3  # continued from a checkpoint at step 13
    session.position.epoch = 1
    watch = notices.CostWatch(session, warned=True)
    etas = []
    for index in range(3):
        _take_step(session, clock, 45.0 if index == 0 else 3.0)
        etas.append(watch.after_step())
    assert etas[:2] == [None, None]
    assert etas[2] == pytest.approx(4 * 3.0 + 1 * (1000 / 100 * 3.0 / 3))
    clock.now += 1.0
    assert watch.step_left() == pytest.approx(2.0)  # what a Ctrl-C now waits for


def test_every_display_shows_the_search_s_own_estimate(tmp_path, caplog):
    """The eta_s each step carries is the figure the "estimated time" line gave (the same estimator)."""
    from maskforge.searches import SearchConfig, notices, search

    steps = []
    with caplog.at_level(logging.INFO, logger="maskforge"):
        search(
            SearchConfig(
                arch="fc", epochs=1, max_steps=6, batch_size=64, device="cpu", workers=0, out=str(tmp_path / "run")
            ),
            on_step=steps.append,
        )
    assert [s.eta_s is None for s in steps] == [True, True, False, False, False, False]
    [line] = [r.getMessage() for r in caplog.records if r.getMessage().startswith("estimated time")]
    assert line.startswith(f"estimated time: about {notices.format_duration(steps[2].eta_s)} for the remaining 3 ")
    assert all(math.isfinite(s.eta_s) and s.eta_s >= 0 for s in steps[2:])


def test_plain_progress_lines_show_that_estimate(capsys):
    from maskforge.cli.progress import LineProgress

    lines = LineProgress(heartbeat=0.0)
    step = SimpleNamespace(
        step=3, total_steps=10, epoch=1, epochs=2, train_loss=1.25, train_acc=0.5, images_per_s=1234.0, eta_s=125.0
    )
    lines.on_step(step)
    assert capsys.readouterr().err.rstrip().endswith("ETA 2 min 05 s")
    lines.on_step(SimpleNamespace(**{**vars(step), "step": 2, "eta_s": None}))  # dense baselines may have none
    assert capsys.readouterr().err.rstrip().endswith(("ETA 2 min 05 s", "ETA 2 min 04 s"))


def test_the_stop_notice_names_what_happens_and_how_long(caplog):
    import signal

    from maskforge.searches import notices

    with caplog.at_level(logging.INFO, logger="maskforge"):
        notices.stopping(signal.SIGINT, 12.2)
        notices.stopping(signal.SIGTERM, None)
    assert [r.getMessage() for r in caplog.records] == [
        "stopping after this step (about 13 s); press Ctrl-C again to stop now",
        "SIGTERM: stopping after this step to save a checkpoint",
    ]


def test_the_stop_handler_answers_the_first_signal_once(monkeypatch):
    import signal

    from maskforge.searches.stop import StopSignals

    heard = []
    with StopSignals() as signals:
        signals.on_first = heard.append
        signals.training()
        signal.raise_signal(signal.SIGTERM)
        signal.raise_signal(signal.SIGTERM)  # a second SIGTERM only waits too, and is not announced again
        assert (signals.received, heard) == (signal.SIGTERM, [signal.SIGTERM])
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)  # a Ctrl-C after a signal: stop now

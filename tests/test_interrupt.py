"""Ctrl-C and SIGTERM (issue 10, items 4 and 9): a search stopped by a signal writes its checkpoint at the
next step, says so with the command that continues it, and exits 130 (SIGINT) or 143 (SIGTERM); the
continued search ends with the artifact of an uninterrupted one. A signal during start-up, or in another
command, gives one line and no traceback. Outside a terminal the search prints a start line, the
estimated time, one line per epoch and a summary with the next commands.

The signal comes from inside the search, at a known training step, through a test-only architecture
whose forward hook sends it: so the step where the search must stop is known exactly. The oracle for the
artifact is an uninterrupted search of the same arguments, run here with the thread count the child uses.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from typer.testing import CliRunner

from maskforge import archs
from maskforge.checkpoint import CHECKPOINT_NAME, load_checkpoint
from maskforge.cli import app
from maskforge.searches import SearchConfig, search

ARCH = "_signal_fc"
# fc on the demo set at a global batch of 500: 8 steps per epoch; 3 epochs.
ARGS = ["--arch", ARCH, "--epochs", "3", "--batch-size", "500", "--device", "cpu", "--workers", "0"]

# Registers ARCH (fc whose forward sends signal SIGNAL to its own process at training forward SIGNAL_AT,
# counted from 1 in this process), then runs the normal CLI.
_LAUNCHER = textwrap.dedent("""
    import os, signal, sys
    from maskforge import archs
    from maskforge.cli import main

    forwards = [0]

    def hook(module, args):
        if module.training and os.environ.get("SIGNAL_AT"):
            forwards[0] += 1
            if forwards[0] == int(os.environ["SIGNAL_AT"]):
                os.kill(os.getpid(), getattr(signal, os.environ["SIGNAL"]))

    @archs.register_arch("_signal_fc", "test-only fc that signals itself")
    def build(*args, **kwargs):
        model = archs.ARCHS["fc"].builder(*args, **kwargs)
        model.register_forward_pre_hook(hook)
        return model

    sys.argv = ["maskforge"] + sys.argv[1:]
    main()
""")


@pytest.fixture
def signal_arch():
    """ARCH registered here too (without a signal unless `arm` is called), so its artifacts compare."""
    state = {"at": None, "signals": ()}
    forwards = [0]

    def hook(module, args):
        if module.training and state["at"] is not None:
            forwards[0] += 1
            if forwards[0] == state["at"]:
                for signum in state["signals"]:
                    signal.raise_signal(signum)

    def build(*args, **kwargs):
        model = archs.ARCHS["fc"].builder(*args, **kwargs)
        model.register_forward_pre_hook(hook)
        return model

    def arm(at: int, *signals: int) -> None:
        state.update(at=at, signals=signals)
        forwards[0] = 0

    archs.register_arch(ARCH, "test-only fc that signals itself")(build)
    yield arm
    archs.ARCHS.pop(ARCH)


def _env(**extra) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "COLUMNS": "200", **extra}


def test_sigterm_checkpoints_at_the_next_step_and_the_same_command_continues(tmp_path, signal_arch):
    launcher, out = tmp_path / "launcher.py", tmp_path / "run"
    launcher.write_text(_LAUNCHER)
    command = [sys.executable, str(launcher), "search", *ARGS, "--out", str(out)]
    stopped = subprocess.run(
        command, env=_env(SIGNAL_AT="11", SIGNAL="SIGTERM"), capture_output=True, text=True, timeout=240
    )
    assert stopped.returncode == 143, stopped.stderr
    lines = stopped.stderr.splitlines()
    assert lines[-2:] == [
        f"interrupted by SIGTERM at step 11 of 24: checkpoint saved in {out}",
        f"continue with: maskforge search --resume {out} (or run the same command again)",
    ], lines
    # answered at once, during step 11, with the time that step has left (steps are timed from the third on)
    assert re.fullmatch(r"SIGTERM: stopping after this step \(about \d+ s\) to save a checkpoint", lines[-3]), lines
    assert "Traceback" not in stopped.stderr and stopped.stdout == ""
    assert load_checkpoint(out / CHECKPOINT_NAME).position["step"] == 11  # the step the signal came in

    # The same command again, output to pipes (not a terminal): it continues, and says what it does.
    continued = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=240)
    assert continued.returncode == 0, continued.stderr
    log = continued.stderr.splitlines()
    assert log[0].startswith(
        f"continuing the unfinished search in {out} (same arguments) from its checkpoint: "
        f"search {ARCH} k=0.5 seed 0 on mnist5k (4,000 train / 1,000 held-out images, 1x28x28, "
        f"10 classes) -> {out}; device cpu, 1 process(es); 24 steps (3 epoch(s) of 8, batch "
        f"500), from step 11"
    ), log
    # then, in the order they happen: the estimate as soon as two steps are timed (the first of this run,
    # step 12, is not: so after step 14), and one line per epoch (the ETA is that estimate, counting down)
    estimate = (
        r"estimated time: about \d+ (s|min \d\d s) for the remaining 10 steps \(\S+ s per step on cpu, "
        r"held-out evaluations included\)"
    )
    epoch = (
        r"epoch {}/3: train loss \d\.\d{{4}}, acc \d+\.\d%; held-out loss \d\.\d{{4}}, acc \d+\.\d\d%; "
        r"[\d,]+ img/s; step {}/24"
    )
    patterns = [estimate, epoch.format(2, 16) + r", ETA \d+ (s|min \d\d s)", epoch.format(3, 24)]
    assert len(log) == 4 and all(re.fullmatch(pattern, line) for pattern, line in zip(patterns, log[1:])), log
    artifact = out / "artifact.safetensors"
    assert continued.stdout.splitlines()[1:] == [
        continued.stdout.splitlines()[1],  # artifact <path> (<bytes>, <bits per weight>): checked below
        "next:",
        f"  maskforge inspect {artifact}",
        f"  maskforge export {artifact}",
        f"  maskforge eval {out / 'artifact.onnx'}",
    ]
    assert continued.stdout.startswith(f"done: {ARCH} k=0.5 seed=0  held-out accuracy ")
    assert continued.stdout.splitlines()[1].startswith(f"artifact {artifact} (")

    # The oracle: the uninterrupted search, with the child's single thread (the same kernels, the same bits).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        reference = search(
            SearchConfig(arch=ARCH, epochs=3, batch_size=500, device="cpu", workers=0, out=str(tmp_path / "reference"))
        )
    finally:
        torch.set_num_threads(threads)
    assert artifact.read_bytes() == reference.artifact_path.read_bytes()


def test_ctrl_c_checkpoints_and_prints_the_resume_command(tmp_path, signal_arch):
    signal_arch(6, signal.SIGINT)
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["search", *ARGS, "--out", str(out), "-q"])
    assert result.exit_code == 130, result.output
    assert result.stderr.splitlines() == [
        f"interrupted by SIGINT at step 6 of 24: checkpoint saved in {out}",
        f"continue with: maskforge search --resume {out} (or run the same command again)",
    ]
    assert load_checkpoint(out / CHECKPOINT_NAME).position["step"] == 6


def test_a_first_ctrl_c_is_answered_at_once(tmp_path, signal_arch):
    """Issue 17: while the step the signal waits for still runs, the user reads what happens and how long it
    takes; then the checkpoint line."""
    signal_arch(6, signal.SIGINT)
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["search", *ARGS, "--out", str(out)])
    assert result.exit_code == 130, result.output
    lines = result.stderr.splitlines()
    assert re.fullmatch(r"stopping after this step \(about \d+ s\); press Ctrl-C again to stop now", lines[-3]), lines
    assert lines[-2] == f"interrupted by SIGINT at step 6 of 24: checkpoint saved in {out}"


def test_json_reports_the_interruption(tmp_path, signal_arch):
    signal_arch(3, signal.SIGTERM)
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["search", *ARGS, "--out", str(out), "-q", "--json"])
    assert result.exit_code == 143, result.output
    assert json.loads(result.stdout) == {
        "interrupted": "SIGTERM",
        "exit_code": 143,
        "run_dir": str(out),
        "checkpoint_step": 3,
        "total_steps": 24,
        "resume": f"maskforge search --resume {out}",
    }


def test_a_second_ctrl_c_stops_at_once(tmp_path, signal_arch):
    signal_arch(6, signal.SIGINT, signal.SIGINT)
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["search", *ARGS, "--checkpoint-every", "4", "--out", str(out), "-q"])
    assert result.exit_code == 130, result.output
    assert result.stderr.splitlines() == ["error: interrupted"]
    assert load_checkpoint(out / CHECKPOINT_NAME).position["step"] == 4  # the last periodic one, intact


def test_ctrl_c_during_start_up_is_one_line(tmp_path, monkeypatch):
    def interrupted_load(*args, **kwargs):
        signal.raise_signal(signal.SIGINT)

    monkeypatch.setattr(sys.modules["maskforge.searches.setup"], "load_data", interrupted_load)
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["search", "--arch", "fc", "--out", str(out)])
    assert result.exit_code == 130
    assert result.stderr.splitlines() == [
        f"interrupted by SIGINT during start-up, before the first step ({out} is unchanged)"
    ]
    assert not out.exists()


@pytest.mark.parametrize(
    "signum,line,code", [(signal.SIGINT, "error: interrupted", 130), (signal.SIGTERM, "error: terminated", 143)]
)
def test_a_signal_in_any_command_is_one_line(monkeypatch, signum, line, code):
    def signalled(*args, **kwargs):
        signal.raise_signal(signum)

    monkeypatch.setattr("maskforge.cli.archs_cmd.list_archs", signalled)
    result = CliRunner().invoke(app, ["archs"])
    assert (result.exit_code, result.stderr.splitlines()) == (code, [line])
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the CLI's handler is gone again

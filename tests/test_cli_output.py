"""The command line for people and for pipelines (issue 10, items 9 and 13): `search --json`, the plain
progress lines outside a terminal, `--debug` after the command's name, `--version`, `python -m maskforge`.

(The output of a search with stdout and stderr to pipes is checked end to end in tests/test_interrupt.py.)
"""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

from typer.testing import CliRunner

from maskforge.artifact import load_artifact
from maskforge.cli import app


def test_search_json_prints_the_summary(tmp_path):
    out = tmp_path / "run"
    command = [
        "search",
        "--arch",
        "fc",
        "--epochs",
        "1",
        "--max-steps",
        "2",
        "--batch-size",
        "64",
        "--device",
        "cpu",
        "--out",
        str(out),
        "--json",
        "-q",
    ]
    result = CliRunner().invoke(app, command)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)  # stdout holds the JSON document and nothing else
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    artifact = load_artifact(out / "artifact.safetensors")
    assert summary == {
        "run_dir": str(out),
        "artifact": str(out / "artifact.safetensors"),
        "arch": "fc",
        "k": 0.5,
        "seed": 0,
        "epochs": 1,
        "steps": 2,
        "heldout_acc": metrics[-1]["heldout_acc"],
        "heldout_loss": metrics[-1]["heldout_loss"],
        "train_loss": metrics[-1]["train_loss"],
        "file_bytes": (out / "artifact.safetensors").stat().st_size,
        "bits_per_weight": 8 * (out / "artifact.safetensors").stat().st_size / artifact.masked_weights,
        "metrics": str(out / "metrics.jsonl"),
        "already_done": False,
        "next": [
            f"maskforge inspect {out / 'artifact.safetensors'}",
            f"maskforge export {out / 'artifact.safetensors'}",
            f"maskforge eval {out / 'artifact.onnx'}",
        ],
    }
    # The same command again (the README's set-up line run twice): already done, exit 0, nothing touched.
    files = {path: path.stat().st_mtime_ns for path in out.rglob("*")}
    again = CliRunner().invoke(app, command)
    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout) == {**summary, "already_done": True}
    assert {path: path.stat().st_mtime_ns for path in out.rglob("*")} == files
    plain = CliRunner().invoke(app, command[:-2])
    assert plain.exit_code == 0 and plain.stdout.startswith("already done: fc k=0.5 seed=0  held-out accuracy ")
    assert f"nothing ran: {out} holds this search (the same arguments), finished" in plain.stdout


def test_the_suggested_commands_work_for_every_distribution(tmp_path):
    """The export that `next` suggests writes the very file the suggested eval reads (kaiming_normal cannot
    be regenerated in ONNX, so its default export is compact, under another name)."""
    runner = CliRunner()
    out = tmp_path / "run"
    result = runner.invoke(
        app,
        [
            "search",
            "--arch",
            "fc",
            "--init",
            "kaiming_normal",
            "--epochs",
            "1",
            "--max-steps",
            "2",
            "--batch-size",
            "64",
            "--device",
            "cpu",
            "--out",
            str(out),
            "--json",
            "-q",
        ],
    )
    assert result.exit_code == 0, result.output
    inspect_command, export_command, eval_command = json.loads(result.stdout)["next"]
    result = runner.invoke(app, export_command.split()[1:])
    assert result.exit_code == 0, result.output
    evaluated = Path(eval_command.split()[-1])
    assert evaluated.is_file() and evaluated.suffix == ".onnx"
    assert evaluated.name != "artifact.onnx"  # the regen file's name: kaiming_normal exports compact


def test_plain_progress_writes_a_line_per_epoch_and_a_heartbeat(capsys):
    from maskforge.cli.progress import LineProgress

    lines = LineProgress(heartbeat=0.0)  # every step is "a long time" after the last line
    step = SimpleNamespace(
        step=3, total_steps=10, epoch=1, epochs=2, train_loss=1.25, train_acc=0.5, images_per_s=1234.0
    )
    lines.on_step(step)
    lines.on_epoch(
        {
            "epoch": 1,
            "step": 5,
            "train_loss": 1.0,
            "train_acc": 0.5,
            "heldout_loss": 0.75,
            "heldout_acc": 0.625,
            "images_per_s": 2000.0,
        }
    )
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("step 3/10 (epoch 1/2): loss 1.2500, acc 50.0%, 1,234 img/s, ETA ")
    assert err[1].startswith(
        "epoch 1/2: train loss 1.0000, acc 50.0%; held-out loss 0.7500, acc 62.50%; 2,000 img/s; step 5/10, ETA "
    )


def test_debug_is_accepted_after_the_command(monkeypatch, tmp_path):
    def boom(*args, **kwargs):
        raise RuntimeError("injected failure")

    monkeypatch.setattr("maskforge.cli.archs_cmd.list_archs", boom)
    result = CliRunner().invoke(app, ["archs", "--debug"])
    assert isinstance(result.exception, RuntimeError)  # the traceback would show: the runner caught it
    hidden = CliRunner().invoke(app, ["archs"])
    assert hidden.exit_code == 1 and "rerun with --debug" in hidden.stderr


def test_version():
    expected = f"maskforge {importlib.metadata.version('maskforge')}\n"
    result = CliRunner().invoke(app, ["--version"])
    assert (result.exit_code, result.stdout) == (0, expected)
    module = subprocess.run(
        [sys.executable, "-m", "maskforge", "--version"], capture_output=True, text=True, timeout=60
    )
    assert (module.returncode, module.stdout, module.stderr) == (0, expected, "")

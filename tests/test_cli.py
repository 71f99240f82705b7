"""Tests for the `maskforge` command line, driven through typer's CliRunner (and once as a real process):
the commands do what the library does, and every user error is one `error:` line with exit code 2."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import re
import sys
from pathlib import Path

import pytest
from helpers import one_error_line

from typer.testing import CliRunner

from maskforge.archs import arch_names, create_model
from maskforge.cli import app
from maskforge.layers import kept_count, masked_modules

runner = CliRunner()

FC_WEIGHTS = 784 * 300 + 300 * 100 + 100 * 10  # LeNet 300-100 on 1x28x28, 10 classes


def _invoke(*args: str):
    return runner.invoke(app, list(args))


def _one_error_line(result, needle: str | None = None) -> str:
    return one_error_line(result, re.escape(needle) if needle else None, stdout_empty=True)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "run"
    result = runner.invoke(
        app,
        [
            "search",
            "--arch",
            "fc",
            "--max-steps",
            "3",
            "--epochs",
            "1",
            "--seed",
            "3",
            "--batch-size",
            "64",
            "--device",
            "cpu",
            "--workers",
            "0",
            "--quiet",
            "--out",
            str(out),
        ],
        env={"COLUMNS": "1000"},
    )  # no line breaks inside the path
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert text.startswith("done: fc k=0.5 seed=3 held-out accuracy "), text
    assert f"artifact {out / 'artifact.safetensors'} (" in text and " bits per masked weight)" in text
    return out


# ---------------------------------------------------------------------------------------------------------
# archs
# ---------------------------------------------------------------------------------------------------------


def test_no_arguments_shows_help():
    result = CliRunner().invoke(app, [], env={"COLUMNS": "300"})
    assert result.exit_code == 0
    assert result.output.lstrip().startswith("Usage: maskforge [OPTIONS] COMMAND [ARGS]...")
    from maskforge.cli.commands import COMMANDS

    for name, command in COMMANDS.items():
        assert f" {name} " in result.output and command.summary in result.output, name


@pytest.mark.parametrize("argv", [["--help"], ["search", "--help"], ["sweep", "--help"], ["archs"]])
def test_help_starts_without_torch(argv):
    """`maskforge --help` (and `search --help`, `sweep --help`, `archs`) import neither torch nor torchvision."""
    code = (
        "import sys\nfrom maskforge.cli import main\nsys.argv = ['maskforge', *sys.argv[1:]]\n"
        "try:\n    main()\nexcept SystemExit as exc:\n    assert exc.code == 0, exc.code\n"
        "print(sorted(m for m in ('torch', 'torchvision', 'onnx', 'onnxruntime') if m in sys.modules))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, *argv],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]", done.stdout[-500:]


def test_command_summaries_are_the_commands_own():
    """commands.py lists each command's summary (so --help need not import it): it must be the first line
    of the command's docstring."""
    import importlib.util

    from maskforge.cli.commands import COMMANDS

    for name, command in COMMANDS.items():
        if importlib.util.find_spec(command.module) is None:
            continue  # not in this checkout
        importlib.import_module(command.module)
        info = next(info for info in app.registered_commands if info.name == name)
        assert info.callback.__doc__.strip().splitlines()[0] == command.summary, name


def test_archs_table():
    result = _invoke("archs")
    assert result.exit_code == 0, result.output
    for name in arch_names():
        assert name in result.output
    # the fc row shows its CIFAR-10 count (3x32x32 inputs), thousands-separated
    assert f"{3072 * 300 + 300 * 100 + 100 * 10:,}" in result.output


def test_archs_json_lines():
    result = _invoke("archs", "--json")
    assert result.exit_code == 0, result.output
    entries = [json.loads(line) for line in result.output.strip().splitlines()]
    assert [e["name"] for e in entries] == arch_names()
    by_name = {e["name"]: e for e in entries}
    assert by_name["fc"]["weights_cifar10"] == 3072 * 300 + 300 * 100 + 100 * 10
    assert by_name["conv2"]["weights_cifar10"] == 3 * 64 * 9 + 64 * 64 * 9 + 64 * 16 * 16 * 256 + 256 * 256 + 2560
    for entry in entries:
        assert set(entry) >= {"name", "description", "weights_cifar10", "weights_imagenet"}


# ---------------------------------------------------------------------------------------------------------
# search + inspect
# ---------------------------------------------------------------------------------------------------------


def test_search_writes_the_run_folder(run_dir):
    assert (run_dir / "artifact.safetensors").is_file()
    config = json.loads((run_dir / "config.json").read_text())
    assert (config["arch"], config["max_steps"], config["epochs"], config["seed"]) == ("fc", 3, 1, 3)
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 1 and metrics[0]["step"] == 3


def test_inspect_json_agrees_with_independent_computation(run_dir):
    path = run_dir / "artifact.safetensors"
    result = _invoke("inspect", "--json", str(path))
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    model = create_model("fc", in_channels=1, num_classes=10, image_size=(28, 28), k=0.5, seed=3)
    masked = sum(layer.weight.numel() for layer in masked_modules(model).values())
    assert masked == FC_WEIGHTS
    assert summary["arch"] == "fc" and summary["k"] == 0.5 and summary["seed"] == 3
    assert summary["init"] == "signed_constant"
    assert summary["file_bytes"] == os.path.getsize(path)
    assert summary["masked_weights"] == masked
    assert summary["kept_weights"] == sum(
        kept_count(layer.weight.numel(), 0.5) for layer in masked_modules(model).values()
    )
    assert math.isclose(summary["bits_per_weight"], 8 * os.path.getsize(path) / masked)
    assert summary["bits_per_weight"] < 1.2
    assert [layer["name"] for layer in summary["layers"]] == [f"{n}.weight" for n in masked_modules(model)]


def test_inspect_table(run_dir):
    path = run_dir / "artifact.safetensors"
    result = CliRunner().invoke(app, ["inspect", str(path)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    summary = json.loads(_invoke("inspect", "--json", str(path)).output)
    rows = [line for line in result.output.splitlines() if " 1.weight " in line or " 5.weight " in line]
    assert len(rows) == 2 and "300x784" in rows[0] and "10x100" in rows[1]
    assert summary["digest"] in result.output
    assert "fc {'in_channels': 1, 'num_classes': 10, 'image_size': [28, 28]}" in result.output


# ---------------------------------------------------------------------------------------------------------
# the search options are the schema's fields
# ---------------------------------------------------------------------------------------------------------


def test_search_options_are_built_from_the_schema():
    import dataclasses

    import typer.main

    from rich.markup import escape

    from maskforge.schema import SearchConfig

    import maskforge.cli.search_cmd  # noqa: F401  (registers the command; `maskforge search` loads it lazily)

    command = typer.main.get_command(app).commands["search"]
    options = {param.name: param for param in command.params}
    fields = {field.name for field in dataclasses.fields(SearchConfig)}
    assert set(options) == fields | {"resume_dir", "quiet", "overwrite", "as_json"}
    for name in fields:
        description = SearchConfig.__pydantic_fields__[name].description
        assert options[name].help.startswith(escape(description)), name  # rich markup: "[x]" escaped
        assert options[name].default is None, name  # not given: the schema's default applies
        assert f"--{name.replace('_', '-')}" in options[name].opts


def test_search_passes_only_the_options_given(monkeypatch, tmp_path):
    import maskforge.searches as module

    seen = []

    def fake_search(config, **kwargs):
        seen.append(config)
        raise SystemExit(0)

    monkeypatch.setattr(module, "search", fake_search)
    assert _invoke("search", "--k", "0.25", "--no-scale-fan", "--out", str(tmp_path)).exit_code == 0
    from maskforge.schema import SearchConfig

    assert seen == [SearchConfig(k=0.25, scale_fan=False, out=str(tmp_path))]


# ---------------------------------------------------------------------------------------------------------
# errors: one line, exit code 2
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args,needle",
    [
        (
            ["search", "--k", "0"],
            "error: Invalid value for '--k': k is the fraction of weights kept, in (0, 1] "
            "(--k 0.3 keeps 30 % of every layer)",
        ),
        (
            ["search", "--k", "1.5"],
            "error: Invalid value for '--k': k is the fraction of weights kept, in (0, 1] "
            "(--k 0.3 keeps 30 % of every layer)",
        ),
        (["search", "--batch-size", "0"], "error: --batch-size must be >= 1, got 0"),
        (["search", "--arch", "vgg9000"], "error: unknown architecture 'vgg9000'; choose from: fc,"),
        (
            ["search", "--data", "/no/such/folder/anywhere"],
            "error: data source /no/such/folder/anywhere does not exist",
        ),
        (["search", "--epochs", "abc"], "error: Invalid value for '--epochs': "),
        (["search", "--no-such-option"], "error: No such option: --no-such-option"),
        (["inspect", "/no/such/artifact.safetensors"], "error: artifact /no/such/artifact.safetensors does not exist"),
        (["frobnicate"], "error: No such command 'frobnicate'."),
    ],
)
def test_bad_input_is_one_error_line(args, needle, tmp_path):
    if args[0] == "search":
        args = args + ["--out", str(tmp_path / "run")]
    assert _one_error_line(_invoke(*args)).startswith(needle)
    assert not (tmp_path / "run").exists()


def test_inspect_of_a_file_that_is_not_an_artifact(tmp_path):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"this is not a model" * 10)
    assert (
        _one_error_line(_invoke("inspect", str(junk)))
        == f"error: {junk} is not a maskforge artifact (not a safetensors file, or truncated)"
    )
    assert _one_error_line(_invoke("inspect", str(tmp_path))) == f"error: {tmp_path} is a folder, not an artifact file"


def test_corrupted_artifact_is_one_error_line(run_dir, tmp_path):
    data = bytearray((run_dir / "artifact.safetensors").read_bytes())
    data[-1] ^= 0xFF  # last byte of the last tensor
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(bytes(data))
    assert (
        _one_error_line(_invoke("inspect", "--json", str(bad)))
        == f"error: {bad}: tensor mask/5.weight does not match its digest (corrupted)"
    )


# ---------------------------------------------------------------------------------------------------------
# the installed console script
# ---------------------------------------------------------------------------------------------------------


def _console_script() -> str:
    candidate = Path(sys.executable).parent / "maskforge"
    if candidate.exists():
        return str(candidate)
    found = shutil.which("maskforge")
    if not found:
        pytest.skip("the maskforge console script is not installed")
    return found


def test_console_script_entry_point():
    exe = _console_script()
    env = dict(os.environ, COLUMNS="200")
    ok = subprocess.run([exe, "archs"], capture_output=True, text=True, timeout=120, env=env)
    assert ok.returncode == 0, ok.stderr
    assert "Traceback" not in ok.stderr
    for name in arch_names():
        assert f" {name} " in ok.stdout, name

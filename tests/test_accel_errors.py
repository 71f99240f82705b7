"""Bad input of the accelerator options (issue 11): `compile` without a compiler toolchain, `precision bf16`
on a device without bfloat16, `deterministic` with an operation that has no deterministic kernel, an
unknown `masker`. Each is one `error:` line and exit code 2, both for a new search (nothing is created)
and for `--resume` of an interrupted run recorded with those options on a machine that cannot honour
them now (every file of the run folder stays as it was, byte for byte).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from typer.testing import CliRunner

from helpers import write_image_folder
from maskforge import archs
from maskforge.cli import app
from maskforge.layers import MaskedLinear
from maskforge.searches import SearchConfig, search
from maskforge.searches import device as device_module

EXECUTABLE = Path(sys.executable).parent / "maskforge"
NO_CXX = "/nonexistent/bin/g++"
MESSAGES = {
    "compile": "compile on cpu needs a C++ compiler for inductor's CPU kernels: CXX=/nonexistent/bin/g++ names "
    "no program that exists on this machine; install it, or leave compile off",
    "bf16": "precision 'bf16' was requested but device cpu has no bfloat16 support (a GPU of compute capability "
    "8.0 or newer has it); use precision fp32",
    "deterministic": f"deterministic: the operation put_ of this search has no deterministic implementation on "
    f"cpu in PyTorch {torch.__version__.split('+')[0]}; leave deterministic off for this search",
}


class _Scatter(nn.Module):
    """Writes two logits with `put_`, which has no deterministic kernel, when `enabled`."""

    enabled = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _Scatter.enabled:
            return x
        return x.clone().put_(torch.tensor([0, 0]), torch.tensor([0.0, 0.0]))


def _build(in_channels: int, num_classes: int, image_size, k: float = 0.5) -> nn.Module:
    return nn.Sequential(
        nn.Flatten(), MaskedLinear(in_channels * image_size[0] * image_size[1], num_classes, k=k), _Scatter()
    )


@pytest.fixture(scope="module")
def arch():
    archs.register_arch("_accel_put", "test-only linear net that may call put_")(_build)
    yield "_accel_put"
    archs.ARCHS.pop("_accel_put")


class _Crash(Exception):
    pass


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory, arch) -> Path:
    """A run folder interrupted at step 3 (checkpoint of step 2), recorded with bf16, compile and
    deterministic. (torch.compile is replaced by the identity while it is made: what is recorded matters
    here, not the compiled kernels.)"""
    root = tmp_path_factory.mktemp("accel_errors")
    data = write_image_folder(root / "images", 32, 8)
    run = root / "run"
    real_compile = torch.compile
    torch.compile = lambda model, *args, **kwargs: model

    def crash(progress):
        if progress.step == 3:
            raise _Crash()

    try:
        with pytest.raises(_Crash):
            search(
                SearchConfig(
                    arch=arch,
                    data=str(data),
                    epochs=1,
                    batch_size=8,
                    workers=0,
                    device="cpu",
                    precision="bf16",
                    compile=True,
                    deterministic=True,
                    masker="torch",
                    checkpoint_every=2,
                    out=str(run),
                ),
                on_step=crash,
            )
    finally:
        torch.compile = real_compile
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint.safetensors", "config.json"]
    return run


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _refused(argv: list[str], message: str) -> None:
    result = CliRunner().invoke(app, argv)
    assert (result.exit_code, result.stdout, result.stderr) == (2, "", f"error: {message}\n"), result.output


@pytest.fixture
def no_compiler(monkeypatch):
    monkeypatch.setenv("CXX", NO_CXX)


@pytest.fixture
def no_bf16(monkeypatch):
    monkeypatch.setattr(device_module, "bf16_supported", lambda device: False)


@pytest.fixture
def put_enabled(monkeypatch):
    monkeypatch.setattr(_Scatter, "enabled", True)
    monkeypatch.setattr(torch, "compile", lambda model, *args, **kwargs: model)


CASES = {
    "compile": (["--compile"], "no_compiler"),
    "bf16": (["--precision", "bf16"], "no_bf16"),
    "deterministic": (["--deterministic"], "put_enabled"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_new_search_is_refused_before_anything_is_created(request, tmp_path, arch, interrupted, case):
    flags, fixture = CASES[case]
    request.getfixturevalue(fixture)
    data = interrupted.parent / "images"
    out = tmp_path / "new"
    _refused(
        [
            "search",
            "--arch",
            arch,
            "--data",
            str(data),
            "--max-steps",
            "2",
            "--batch-size",
            "8",
            "--device",
            "cpu",
            *flags,
            "--out",
            str(out),
            "-q",
        ],
        MESSAGES[case],
    )
    assert not out.exists()


@pytest.mark.parametrize("case", sorted(CASES))
def test_resuming_where_the_option_cannot_be_honoured_changes_no_file(request, interrupted, case):
    request.getfixturevalue(CASES[case][1])
    before = _files(interrupted)
    _refused(["search", "--resume", str(interrupted), "-q"], MESSAGES[case])
    assert _files(interrupted) == before


def test_an_unknown_masker_is_refused(tmp_path, interrupted):
    out = tmp_path / "new"
    _refused(
        ["search", "--masker", "fastest", "--out", str(out)],
        "--masker must be one of 'numpy' or 'torch', got 'fastest'",
    )
    assert not out.exists()
    before = _files(interrupted)
    _refused(
        ["search", "--resume", str(interrupted), "--masker", "fastest", "-q"],
        f"resume of {interrupted}: masker fastest (recorded: torch) conflict with the arguments recorded in "
        f"{interrupted / 'config.json'}; leave them out to continue with the recorded ones",
    )
    assert _files(interrupted) == before


def test_compile_without_gcc_on_path_from_the_real_executable(tmp_path):
    """The installed command, in a process whose PATH holds only the Python environment (no g++)."""
    env = {key: value for key, value in os.environ.items() if key not in ("CXX", "CC")}
    env["PATH"] = str(EXECUTABLE.parent)
    if any((Path(folder) / "g++").exists() for folder in env["PATH"].split(os.pathsep)):
        pytest.skip("the Python environment's folder holds a g++")
    out = tmp_path / "new"
    done = subprocess.run(
        [str(EXECUTABLE), "search", "--arch", "fc", "--compile", "--max-steps", "1", "--out", str(out), "-q"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr == (
        "error: compile on cpu needs a C++ compiler for inductor's CPU kernels (g++ on PATH, or "
        "CXX), and none was found; install it, or leave compile off\n"
    )
    assert not out.exists()

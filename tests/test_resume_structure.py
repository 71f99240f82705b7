"""Resume of a builder reference checks the code against the structure recorded at search start.

A checkpoint of a builder reference (torchvision:NAME, module:callable, file.py:callable) records the
builder's structure listing (maskforge.convert.structure_entries), as the artifact does. A resume after
the user's code changed that structure is refused in one line naming the first difference, also when
every tensor of the checkpoint still has its shape (a GroupNorm swapped for an InstanceNorm). Oracles:
structure lines written out by hand, and a checkpoint without the record (as written before it existed),
which the same edited code resumes: shapes alone cannot tell the difference.
"""

from __future__ import annotations

import shutil
import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

from helpers import write_image_folder
from maskforge import convert
from maskforge.artifact import load_artifact
from maskforge.checkpoint import CHECKPOINT_NAME, load_checkpoint, save_checkpoint
from maskforge.cli import app
from maskforge.errors import MaskforgeError
from maskforge.searches import SearchConfig, resume, search

NET = textwrap.dedent("""
    import torch.nn as nn


    def build(in_channels, num_classes):
        return nn.Sequential(
            nn.Conv2d(in_channels, 8, 3, padding=1, bias=False),
            NORM,
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(8, num_classes, bias=False),
        )
""")
GROUP_NORM = "nn.GroupNorm(2, 8)"


def _write_net(folder: Path, norm: str, *edits: tuple[str, str]) -> Path:
    path = folder / "net.py"
    text = NET.replace("NORM", norm)
    for old, new in edits:
        text = text.replace(old, new)
    path.write_text(text)
    convert._file_modules.clear()  # this process imported the file before its edit
    return path


@pytest.fixture(scope="module")
def searched(tmp_path_factory) -> Path:
    """A finished search of a user builder whose checkpoint was kept (two steps on 8x8 images)."""
    root = tmp_path_factory.mktemp("structure")
    net = _write_net(root, GROUP_NORM)
    data = write_image_folder(root / "images", 8, 4)
    out = root / "run"
    search(
        SearchConfig(
            arch=f"{net}:build",
            data=str(data),
            epochs=1,
            max_steps=2,
            batch_size=8,
            device="cpu",
            workers=0,
            keep_checkpoint=True,
            out=str(out),
        )
    )
    return out


@pytest.fixture
def run(searched, tmp_path) -> Path:
    """A copy of the searched folder, and the user's module as it was at search time (the copy keeps
    naming the original file: the reference is recorded as written)."""
    target = tmp_path / "run"
    shutil.copytree(searched, target, ignore=shutil.ignore_patterns("*.lock"))
    _write_net(searched.parent, GROUP_NORM)
    return target


def _edit(run: Path, norm: str, *edits: tuple[str, str]) -> None:
    """Edit the user's module that the run's reference names (an absolute path)."""
    _write_net(Path(load_checkpoint(_ckpt(run)).identity.arch.split(":")[0]).parent, norm, *edits)


def _ckpt(run: Path) -> Path:
    return run / CHECKPOINT_NAME


def test_the_checkpoint_records_the_structure_at_search_start(run):
    identity = load_checkpoint(_ckpt(run)).identity
    # written out by hand: parameters and buffers of the builder's own model, in module order
    assert identity.structure == [
        "0.weight param 8x3x3x3 Conv2d",
        "1.weight param 8 GroupNorm",
        "1.bias param 8 GroupNorm",
        "5.weight param 2x8 Linear",
    ]
    assert identity.library.startswith("user code ") and identity.library.endswith("net.py")
    assert load_artifact(run / "artifact.safetensors").meta.arch.structure == identity.structure


def test_resume_refuses_a_changed_structure_whose_shapes_still_fit(run):
    resume(run, {"keep_checkpoint": True})  # the unchanged code resumes
    _edit(run, "nn.InstanceNorm2d(8, affine=True)")
    with pytest.raises(MaskforgeError) as refused:
        resume(run)
    message = str(refused.value)
    assert "\n" not in message
    assert "no longer builds the searched network" in message
    assert (
        "entry 1: recorded '1.weight param 8 GroupNorm', the code now gives '1.weight param 8 InstanceNorm2d'"
        in message
    )


def test_a_checkpoint_without_the_record_compares_shapes_only(run):
    """Checkpoints written before the record existed still load; the same edit then goes unnoticed (which
    is why the record exists)."""
    checkpoint = load_checkpoint(_ckpt(run))
    for key in ("library", "structure", "structure_digest"):
        del checkpoint.document["identity"][key]
    save_checkpoint(checkpoint, _ckpt(run))
    _edit(run, "nn.InstanceNorm2d(8, affine=True)")
    result = resume(run, {"keep_checkpoint": True})
    assert "1.weight param 8 InstanceNorm2d" in result.artifact.meta.arch.structure


def test_cli_resume_after_a_module_type_change_is_one_error_line(run):
    before = (_ckpt(run)).read_bytes()
    _edit(run, "nn.BatchNorm2d(8)")
    result = CliRunner().invoke(app, ["search", "--resume", str(run)])
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2, result.output
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert f"checkpoint {_ckpt(run)}: architecture" in lines[0]
    assert "no longer builds the searched network (entry 1: recorded '1.weight param 8 GroupNorm', " in lines[0]
    assert "rebuild it as it was at search time (user code " in lines[0]
    assert _ckpt(run).read_bytes() == before


def test_an_edit_during_the_search_is_not_recorded_as_the_searched_network(searched, tmp_path):
    """The artifact records the structure the search started with: the code edited after the first step
    no longer loads it (before, the artifact recorded the edited code and loaded with a network the masks
    were not searched on)."""
    net = _write_net(tmp_path, GROUP_NORM)

    def edit_after_the_first_step(progress) -> None:
        if progress.step == 1:
            _write_net(tmp_path, "nn.InstanceNorm2d(8, affine=True)")

    config = load_checkpoint(_ckpt(searched)).meta.config.replace(arch=f"{net}:build", out=str(tmp_path / "run"))
    result = search(config, on_step=edit_after_the_first_step)
    assert result.artifact.meta.arch.structure[1] == "1.weight param 8 GroupNorm"
    with pytest.raises(MaskforgeError, match="recorded '1.weight param 8 GroupNorm', the code now gives '1.weight"):
        load_artifact(result.artifact_path)


# --- module calls: what the parameter and buffer listing cannot see ---------------------------------------

RELU_TO_GELU = ("nn.ReLU()", "nn.GELU()")
STRIDE_2 = ("padding=1, bias=False", "padding=1, stride=2, bias=False")  # the pooling hides it from shapes


def test_the_calls_are_recorded_with_the_structure(run):
    identity = load_checkpoint(_ckpt(run)).identity
    # written out by hand: one 3x8x8 image through the builder's model, each module call as it ends
    assert identity.calls == [
        "0 Conv2d 1x8x8x8",
        "1 GroupNorm 1x8x8x8",
        "2 ReLU 1x8x8x8",
        "3 AdaptiveAvgPool2d 1x8x1x1",
        "4 Flatten 1x8",
        "5 Linear 1x2",
    ]
    assert load_artifact(run / "artifact.safetensors").meta.arch.calls == identity.calls


def test_resume_refuses_an_activation_swap(run):
    _edit(run, GROUP_NORM, RELU_TO_GELU)
    with pytest.raises(MaskforgeError) as refused:
        resume(run)
    assert str(refused.value).endswith(
        "no longer computes the searched network (module calls, entry 2: recorded '2 ReLU 1x8x8x8', the code "
        f"now gives '2 GELU 1x8x8x8'); rebuild it as it was at search time ({load_checkpoint(_ckpt(run)).identity.library})"
    )


def test_loading_refuses_a_stride_that_no_parameter_shows(run):
    _edit(run, GROUP_NORM, STRIDE_2)
    with pytest.raises(
        MaskforgeError,
        match=r"no longer computes the searched network \(module calls, entry 0: recorded '0 Conv2d 1x8x8x8', "
        r"the code now gives '0 Conv2d 1x8x4x4'\)",
    ):
        load_artifact(run / "artifact.safetensors")


def test_records_without_calls_still_load_and_resume(run):
    """Artifacts and checkpoints of 0.2.0 have no call listing: they load, and the same edit then goes
    unnoticed (which is why the listing exists)."""
    checkpoint = load_checkpoint(_ckpt(run))
    for key in ("calls", "calls_digest"):
        del checkpoint.document["identity"][key]
    save_checkpoint(checkpoint, _ckpt(run))
    _edit(run, GROUP_NORM, RELU_TO_GELU)
    result = resume(run, {"keep_checkpoint": True})
    assert result.artifact.meta.arch.calls is None  # the checkpoint's record, as it was

"""Checkpoint and resume: a search killed with SIGKILL mid-epoch and resumed ends with the artifact of an
uninterrupted run, byte for byte; bad `--resume` input fails with one line, exit 2, and changes nothing.

The oracle is always an uninterrupted run of the same arguments (never values copied from the code).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from typer.testing import CliRunner

from helpers import write_image_folder
from maskforge import archs
from maskforge.checkpoint import CHECKPOINT_NAME, Checkpoint, load_checkpoint, save_checkpoint
from maskforge.cli import app
from maskforge.errors import MaskforgeError
from maskforge.layers import MaskedConv2d, MaskedLinear, NonAffineBatchNorm2d
from maskforge.searches import TIMING_FIELDS, SearchConfig, resume, search


# fc on the demo set with a global batch of 500: 8 steps per epoch, 16 in all, a few seconds per run.
ARGS = ["--arch", "fc", "--k", "0.5", "--epochs", "2", "--batch-size", "500", "--device", "cpu", "-q"]


#: `maskforge search ARGS` in a process that kills itself (SIGKILL) right after writing a checkpoint in the
#: second epoch, two or more batches in.
_KILLED_AFTER_CHECKPOINT = r"""
import os, signal, sys
import maskforge.searches as searches
from maskforge.cli import main

write = searches.save_checkpoint


def write_then_die(session, epoch_sums):
    write(session, epoch_sums)
    if session.position.epoch == 1 and session.position.batch_in_epoch >= 2:
        os.kill(os.getpid(), signal.SIGKILL)


searches.save_checkpoint = write_then_die
sys.argv = ["maskforge", "search", *sys.argv[1:]]
main()
"""


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "maskforge.cli", "search", *args]


def _env() -> dict:
    # One thread per process: the same kernels (so the same bits) however busy the machine is.
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "COLUMNS": "200"}


def _metrics(folder: Path) -> list[dict]:
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING_FIELDS} for r in records]


def _snapshot(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


# ---------------------------------------------------------------------------------------------------------
# the kill test
# ---------------------------------------------------------------------------------------------------------


def test_sigkill_mid_epoch_then_resume_gives_the_uninterrupted_artifact(tmp_path):
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    # The uninterrupted run, in this process with the single thread the subprocesses get (same kernels).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        search(SearchConfig(arch="fc", k=0.5, epochs=2, batch_size=500, device="cpu", out=str(reference)))
    finally:
        torch.set_num_threads(threads)

    # The search SIGKILLs itself right after the first checkpoint written two batches into the second
    # epoch (a hook, not a timer): the state a crash mid-epoch leaves.
    victim = subprocess.run(
        [sys.executable, "-c", _KILLED_AFTER_CHECKPOINT, *ARGS, "--checkpoint-every", "2", "--out", str(killed)],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert victim.returncode == -signal.SIGKILL, f"the run ended on its own before it could be killed: {victim.stderr}"
    assert not (killed / "artifact.safetensors").exists()
    on_disk = load_checkpoint(killed / CHECKPOINT_NAME).position
    assert on_disk["epoch"] == 1 and 0 < on_disk["batch_in_epoch"] < on_disk["steps_per_epoch"]
    assert on_disk["step"] == on_disk["steps_per_epoch"] + on_disk["batch_in_epoch"]

    resumed = subprocess.run(
        _cli("--resume", str(killed), "-q"), env=_env(), capture_output=True, text=True, timeout=240
    )
    assert resumed.returncode == 0, resumed.stderr
    assert "done" in resumed.stdout

    assert (killed / "artifact.safetensors").read_bytes() == (reference / "artifact.safetensors").read_bytes()
    assert _metrics(killed) == _metrics(reference)
    assert len(_metrics(reference)) == 2
    # The recorded arguments are the original ones.
    assert json.loads((killed / "config.json").read_text()) == {
        **json.loads((reference / "config.json").read_text()),
        "out": str(killed),
        "checkpoint_every": 2,
    }


# ---------------------------------------------------------------------------------------------------------
# in-process exactness with batch norm, augmentation, momentum and a data-loader data set
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture
def bn_arch():
    """A tiny conv net with (non-affine) batch norm, registered for this test only."""

    def build(in_channels, num_classes, image_size, k=0.5):
        return nn.Sequential(
            MaskedConv2d(in_channels, 8, 3, padding=1, k=k),
            NonAffineBatchNorm2d(8),
            nn.ReLU(),
            nn.AvgPool2d(2),
            nn.Flatten(),
            MaskedLinear(8 * (image_size[0] // 2) * (image_size[1] // 2), num_classes, k=k),
        )

    archs.register_arch("_test_bn", "test-only conv + BN")(build)
    yield "_test_bn"
    archs.ARCHS.pop("_test_bn")


class _Crash(Exception):
    pass


def test_resume_is_exact_with_batchnorm_augmentation_and_momentum(tmp_path, bn_arch):
    data = write_image_folder(tmp_path / "images", 40)
    common = dict(
        arch=bn_arch,
        k=0.4,
        data=str(data),
        epochs=3,
        batch_size=16,
        workers=0,
        device="cpu",
        lr=0.05,
        label_smoothing=0.1,
        warmup_epochs=1,
    )
    reference = search(SearchConfig(**common, out=str(tmp_path / "ref")))
    assert reference.artifact.bn_stats  # the network really has batch norm

    # Crash right after global step 8 (epoch 2, batch 3): the last checkpoint is the one after step 6.
    def crash(progress):
        if progress.step == 8:
            raise _Crash()

    run = tmp_path / "run"
    with pytest.raises(_Crash):
        search(SearchConfig(**common, checkpoint_every=3, out=str(run)), on_step=crash)
    position = load_checkpoint(run / CHECKPOINT_NAME).position
    assert (position["epoch"], position["batch_in_epoch"], position["step"]) == (1, 1, 6)
    assert len(load_checkpoint(run / CHECKPOINT_NAME).document["metrics"]) == 1

    epochs_seen = []
    result = resume(run, {"keep_checkpoint": True}, on_epoch=lambda record: epochs_seen.append(record["epoch"]))
    assert epochs_seen == [2, 3]
    assert (run / "artifact.safetensors").read_bytes() == (tmp_path / "ref" / "artifact.safetensors").read_bytes()
    assert _metrics(run) == _metrics(tmp_path / "ref")
    assert result.metrics[-1]["heldout_acc"] == reference.metrics[-1]["heldout_acc"]

    # Resuming a finished run (that kept its checkpoint) changes nothing: it rebuilds the same artifact.
    before = (run / "artifact.safetensors").read_bytes()
    resume(run)
    assert (run / "artifact.safetensors").read_bytes() == before


def test_checkpoint_holds_what_the_search_had(tmp_path):
    """The saved scores/momentum are those of the model after the epoch (oracle: a spy on the optimizer)."""
    seen = {}
    out = tmp_path / "run"

    def spy(record):
        seen["record"] = record

    result = search(
        SearchConfig(
            arch="fc",
            epochs=1,
            max_steps=2,
            batch_size=500,
            device="cpu",
            workers=0,
            keep_checkpoint=True,
            out=str(out),
        ),
        on_epoch=spy,
    )
    ckpt = load_checkpoint(out / CHECKPOINT_NAME)
    assert ckpt.position == {"epoch": 1, "batch_in_epoch": 0, "step": 2, "steps_per_epoch": 8, "total_steps": 2}
    assert ckpt.document["metrics"] == [seen["record"]]
    names = sorted(ckpt.tensors)
    assert names == [
        "momentum/1.scores",
        "momentum/3.scores",
        "momentum/5.scores",
        "rng/torch_cpu",
        "scores/1.scores",
        "scores/3.scores",
        "scores/5.scores",
    ]
    # The artifact's masks are the top-k of the checkpoint's scores.
    for param, mask in result.artifact.masks.items():
        scores = ckpt.tensors[f"scores/{param.rsplit('.', 1)[0]}.scores"].abs().reshape(-1)
        kept = int(mask.sum())
        threshold = torch.sort(scores, descending=True).values[kept - 1]
        assert bool((scores.reshape(mask.shape)[mask] >= threshold).all())
        assert bool((scores.reshape(mask.shape)[~mask] <= threshold).all())


# ---------------------------------------------------------------------------------------------------------
# bad input: one line, exit 2, nothing in the run folder changes
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("finished") / "run"
    search(
        SearchConfig(
            arch="fc",
            epochs=1,
            max_steps=2,
            batch_size=500,
            device="cpu",
            workers=0,
            keep_checkpoint=True,
            out=str(out),
        )
    )
    return out


def _copy(run: Path, tmp_path: Path) -> Path:
    target = tmp_path / "copy"
    shutil.copytree(run, target)
    return target


def _fails(argv: list[str], needle: str, folder: Path | None = None, *, exact: bool = False) -> None:
    """One `error:` line, exit 2, nothing in `folder` changed; the line contains `needle` (a phrase of the
    message, never a part of a path) or, with `exact`, is it."""
    before = _snapshot(folder) if folder is not None and folder.is_dir() else None
    result = CliRunner().invoke(app, argv)
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2, (result.exit_code, result.output)
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert lines[0] == needle if exact else needle in lines[0], lines[0]
    if before is not None:
        assert _snapshot(folder) == before


def test_resume_of_a_missing_folder(tmp_path):
    _fails(["search", "--resume", str(tmp_path / "nope")], "no such run folder")
    assert not (tmp_path / "nope").exists()


def test_resume_without_a_checkpoint(finished_run, tmp_path):
    run = _copy(finished_run, tmp_path)
    (run / CHECKPOINT_NAME).unlink()
    _fails(["search", "--resume", str(run)], "holds a finished search (artifact.safetensors): nothing to resume", run)
    (run / "artifact.safetensors").unlink()  # a search that stopped before its first checkpoint
    _fails(["search", "--resume", str(run)], "no checkpoint at", run)


def test_resume_of_a_folder_that_is_not_a_run(tmp_path):
    (tmp_path / "empty").mkdir()
    _fails(["search", "--resume", str(tmp_path / "empty")], "not a search run folder", tmp_path / "empty")


@pytest.mark.parametrize(
    "damage,message",
    [
        ("flip a data byte", "error: checkpoint {path}: tensor rng/torch_cpu does not match its digest (corrupted)"),
        (
            "truncate",
            "error: checkpoint {path} is truncated, or trailing data (safetensors: incomplete metadata, file not "
            "fully covered)",
        ),
        ("garbage", "error: checkpoint {path} is not a maskforge checkpoint (not a safetensors file, or truncated)"),
        ("empty", "error: checkpoint {path} is not a maskforge checkpoint (only 0 bytes)"),
    ],
)
def test_resume_with_a_corrupt_checkpoint(finished_run, tmp_path, damage, message):
    run = _copy(finished_run, tmp_path)
    path = run / CHECKPOINT_NAME
    data = bytearray(path.read_bytes())
    if damage == "flip a data byte":
        data[-100] ^= 0x01
    elif damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "garbage":
        data = bytearray(b"this is not a checkpoint at all" * 10)
    else:
        data = bytearray()
    path.write_bytes(bytes(data))
    _fails(["search", "--resume", str(run)], message.format(path=path), run, exact=True)


def test_resume_with_edited_checkpoint_metadata(finished_run, tmp_path):
    run = _copy(finished_run, tmp_path)
    ckpt = load_checkpoint(run / CHECKPOINT_NAME)
    text = (run / CHECKPOINT_NAME).read_bytes()
    # Change the recorded step inside the JSON header without fixing the digest.
    header_len = int.from_bytes(text[:8], "little")
    header = text[8 : 8 + header_len].replace(b'\\"step\\":2', b'\\"step\\":1')
    assert header != text[8 : 8 + header_len] and len(header) == header_len
    (run / CHECKPOINT_NAME).write_bytes(text[:8] + header + text[8 + header_len :])
    assert ckpt.position["step"] == 2
    _fails(["search", "--resume", str(run)], "metadata digest mismatch (the JSON document was modified", run)


@pytest.mark.parametrize("field,value,recorded", [("arch", "conv2", "'fc'"), ("k", 0.3, "0.5"), ("seed", 7, "0")])
def test_resume_with_a_checkpoint_of_another_search(finished_run, tmp_path, field, value, recorded):
    # The folder's config says one network, its checkpoint holds another one's scores.
    run = _copy(finished_run, tmp_path)
    config = json.loads((run / "config.json").read_text())
    config[field] = value
    (run / "config.json").write_text(json.dumps(config))
    _fails(
        ["search", "--resume", str(run)],
        f"error: checkpoint {run / CHECKPOINT_NAME} was written by a different search: {field} {recorded} "
        f"(this run: {value!r})",
        run,
        exact=True,
    )


def test_resume_with_a_checkpoint_whose_tensors_do_not_fit(finished_run, tmp_path):
    run = _copy(finished_run, tmp_path)
    ckpt = load_checkpoint(run / CHECKPOINT_NAME)
    ckpt.tensors["scores/1.scores"] = torch.zeros(3, 3)
    save_checkpoint(Checkpoint(ckpt.document, ckpt.tensors), run / CHECKPOINT_NAME)  # valid digests
    _fails(["search", "--resume", str(run)], "tensor scores/1.scores is [3, 3]", run)


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["--k", "0.3"], ": k 0.3 (recorded: 0.5) conflict with the arguments recorded in"),
        (["--batch-size", "100"], ": batch_size 100 (recorded: 500) conflict with"),
        (["--arch", "conv2", "--lr", "0.2"], ": arch conv2 (recorded: fc); lr 0.2 (recorded: 0.1) conflict with"),
        (["--out", "somewhere/else"], ": out somewhere/else (the run folder is "),
        (["--compile"], ": compile True (recorded: False) conflict with"),
    ],
)
def test_resume_with_conflicting_arguments(finished_run, tmp_path, argv, needle):
    run = _copy(finished_run, tmp_path)
    _fails(["search", "--resume", str(run), *argv], needle, run)


def test_resume_accepts_repeated_and_operational_arguments(finished_run, tmp_path):
    run = _copy(finished_run, tmp_path)
    before = (run / "artifact.safetensors").read_bytes()
    result = CliRunner().invoke(
        app,
        [
            "search",
            "--resume",
            str(run),
            "--arch",
            "fc",
            "--k",
            "0.5",
            "--workers",
            "3",
            "--checkpoint-every",
            "5",
            "--out",
            str(run),
            "-q",
        ],
    )
    assert result.exit_code == 0, result.output
    assert (run / "artifact.safetensors").read_bytes() == before
    # the record holds what the run now uses: the new operational values, the same search
    recorded = json.loads((finished_run / "config.json").read_text())
    assert json.loads((run / "config.json").read_text()) == {
        **recorded,
        "out": str(run),
        "workers": 3,
        "checkpoint_every": 5,
    }


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_device_cuda_without_cuda(finished_run, tmp_path):
    _fails(["search", "--arch", "fc", "--device", "cuda", "--out", str(tmp_path / "new")], "CUDA is not available")
    assert not (tmp_path / "new").exists()
    run = _copy(finished_run, tmp_path)
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**config, "device": "cuda"}))
    _fails(["search", "--resume", str(run)], "CUDA is not available", run)


def test_world_size_that_does_not_divide_the_batch(tmp_path, monkeypatch):
    # What torchrun --nproc-per-node 3 sets; the check runs before any process group is joined.
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    _fails(
        ["search", "--arch", "fc", "--batch-size", "128", "--out", str(tmp_path / "new")],
        "error: batch_size 128 is the global batch and must be a multiple of the number of processes (3), e.g. 129",
    )
    assert not (tmp_path / "new").exists()


def test_resume_with_another_number_of_processes(finished_run, tmp_path):
    run = _copy(finished_run, tmp_path)
    ckpt = load_checkpoint(run / CHECKPOINT_NAME)
    document = dict(ckpt.document, world_size=2, train_sums=ckpt.document["train_sums"] * 2)
    save_checkpoint(Checkpoint(document, ckpt.tensors), run / CHECKPOINT_NAME)
    _fails(["search", "--resume", str(run)], "was written by 2 process(es)", run)


def test_fresh_search_refuses_to_overwrite_an_unfinished_run(finished_run, tmp_path):
    run = _copy(finished_run, tmp_path)
    (run / "artifact.safetensors").unlink()
    ckpt = load_checkpoint(run / CHECKPOINT_NAME)
    position = dict(ckpt.position, epoch=0, batch_in_epoch=1, step=1)
    save_checkpoint(Checkpoint(dict(ckpt.document, position=position), ckpt.tensors), run / CHECKPOINT_NAME)
    _fails(["search", "--arch", "fc", "--out", str(run)], "holds an unfinished search with other arguments", run)


def test_load_checkpoint_errors_are_maskforge_errors(tmp_path):
    with pytest.raises(MaskforgeError) as caught:
        load_checkpoint(tmp_path / "missing.safetensors")
    assert str(caught.value) == (
        f"no checkpoint at {tmp_path / 'missing.safetensors'}: nothing to resume (a search "
        f"writes one at the end of every epoch and every checkpoint_every steps)"
    )
    with pytest.raises(MaskforgeError) as caught:
        load_checkpoint(tmp_path)
    assert str(caught.value) == f"{tmp_path} is a folder, not a checkpoint file"

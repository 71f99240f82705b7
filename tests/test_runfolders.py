"""Run folders (issue 10, items 1, 6, 7, 16): a search never destroys a finished run; each search gets its
own folder by default; files derived from an older artifact never sit unmarked beside a newer one; an
unfinished search with the same arguments is continued; a finished search is extended from its kept
checkpoint (and only then); the checkpoint goes when the search finishes; metrics reach TensorBoard.

Oracles: the bytes of the files before and after (SHA-256 of every file), uninterrupted runs of the same
arguments, the documented schedule written out here, and TensorBoard's own reader.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest
from helpers import without_timings
from typer.testing import CliRunner

from maskforge.cli import app
from maskforge.errors import MaskforgeError
from maskforge.searches import SearchConfig, resume, search

# fc on the demo set, global batch 500: 8 steps per epoch, a fraction of a second per epoch.
COMMON = dict(arch="fc", epochs=2, batch_size=500, device="cpu", workers=0)


def _files(folder: Path) -> dict[str, str]:
    """Every file under `folder` (relative path -> SHA-256)."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished 2-epoch search that kept its checkpoint, with a derived file beside its artifact."""
    out = tmp_path_factory.mktemp("finished") / "run"
    search(SearchConfig(**COMMON, keep_checkpoint=True, out=str(out)))
    (out / "artifact.onnx").write_bytes(b"an export of this run's artifact")
    return out


def _copy(folder: Path, tmp_path: Path) -> Path:
    import shutil

    return Path(shutil.copytree(folder, tmp_path / "copy"))


# --- item 1: a finished run is never overwritten silently -------------------------------------------------


def test_a_second_search_into_a_finished_run_is_refused(finished, tmp_path):
    run = _copy(finished, tmp_path)
    before = _files(run)
    result = CliRunner().invoke(
        app,
        [
            "search",
            "--arch",
            "fc",
            "--k",
            "0.3",
            "--epochs",
            "1",
            "--max-steps",
            "1",
            "--device",
            "cpu",
            "--out",
            str(run),
            "-q",
        ],
    )
    assert result.exit_code == 2, result.output
    assert result.stderr.strip() == (
        f"error: {run} holds a finished search (artifact.safetensors) with other arguments (batch_size 128 "
        f"(recorded: 500); epochs 1 (recorded: 2); k 0.3 (recorded: 0.5); max_steps 1 (recorded: None)): choose another folder with --out, leave --out out to "
        f"get a new numbered one, or add --overwrite to replace it (its files move to {run}/previous-N)"
    )
    assert _files(run) == before


def test_overwrite_moves_the_old_run_and_its_exports_to_previous(finished, tmp_path):
    run = _copy(finished, tmp_path)
    before = _files(run)
    result = CliRunner().invoke(
        app,
        [
            "search",
            "--arch",
            "fc",
            "--k",
            "0.3",
            "--epochs",
            "1",
            "--max-steps",
            "1",
            "--batch-size",
            "500",
            "--device",
            "cpu",
            "--out",
            str(run),
            "--overwrite",
            "-q",
        ],
    )
    assert result.exit_code == 0, result.output
    after = _files(run)
    # everything the folder held, byte for byte, is now under previous-1/; the export no longer sits beside
    # the new artifact
    assert {
        name[len("previous-1/") :]: digest for name, digest in after.items() if name.startswith("previous-1/")
    } == before
    assert sorted(name for name in after if not name.startswith("previous-")) == [
        "artifact.safetensors",
        "config.json",
        "metrics.csv",
        "metrics.jsonl",
    ]
    assert json.loads((run / "config.json").read_text())["k"] == 0.3
    # a second overwrite keeps the first generation: numbered, never replaced
    result = CliRunner().invoke(
        app,
        [
            "search",
            "--arch",
            "fc",
            "--k",
            "0.2",
            "--epochs",
            "1",
            "--max-steps",
            "1",
            "--batch-size",
            "500",
            "--device",
            "cpu",
            "--out",
            str(run),
            "--overwrite",
            "-q",
        ],
    )
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in run.iterdir() if p.is_dir()) == ["previous-1", "previous-2"]
    assert _files(run / "previous-1") == {
        n[len("previous-1/") :]: d for n, d in after.items() if n.startswith("previous-1/")
    }


def test_an_overwrite_that_fails_to_start_changes_nothing(finished, tmp_path):
    run = _copy(finished, tmp_path)
    before = _files(run)
    with pytest.raises(MaskforgeError, match="data source .* does not exist"):
        search(SearchConfig(**COMMON, data=str(tmp_path / "missing"), out=str(run)), overwrite=True)
    assert _files(run) == before


def test_each_search_gets_its_own_numbered_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = SearchConfig(**COMMON, max_steps=2, seed=7)
    first, second = search(config), search(config)
    third = search(config.replace(k=0.25))
    # the documented names: runs/<arch>-k<k>-s<seed>, then -2, -3, ... when taken
    assert [r.artifact_path for r in (first, second, third)] == [
        Path("runs/fc-k0.5-s7/artifact.safetensors"),
        Path("runs/fc-k0.5-s7-2/artifact.safetensors"),
        Path("runs/fc-k0.25-s7/artifact.safetensors"),
    ]
    assert json.loads(Path("runs/fc-k0.5-s7-2/config.json").read_text())["out"] == "runs/fc-k0.5-s7-2"


def test_a_default_folder_continues_its_unfinished_search(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = SearchConfig(**COMMON, seed=3, checkpoint_every=3)
    reference = search(config.replace(out="reference"))

    class Stop(Exception):
        pass

    def crash(progress):
        if progress.step == 11:
            raise Stop()

    with pytest.raises(Stop):
        search(config, on_step=crash)
    # another search of other arguments does not touch the unfinished one; the same arguments continue it
    other = search(config.replace(lr=0.05, max_steps=1))
    assert other.run_dir == Path("runs/fc-k0.5-s3-2")
    resumed = search(config)
    assert resumed.run_dir == Path("runs/fc-k0.5-s3")
    assert resumed.artifact_path.read_bytes() == reference.artifact_path.read_bytes()
    assert without_timings(resumed.metrics) == without_timings(reference.metrics)


def test_a_folder_whose_search_never_checkpointed_is_started_over(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps(SearchConfig(arch="fc", k=0.9, out=str(run)).to_dict()))
    (run / "notes.txt").write_text("mine")
    result = search(SearchConfig(**COMMON, max_steps=1, out=str(run)))
    assert json.loads((run / "config.json").read_text())["k"] == 0.5
    assert (run / "notes.txt").read_text() == "mine" and result.artifact_path.exists()


# --- items 6 and 7: the checkpoint at the end; extending a finished search ---------------------------------


def test_the_checkpoint_is_removed_when_the_search_finishes(tmp_path):
    plain = search(SearchConfig(**COMMON, max_steps=3, out=str(tmp_path / "plain")))
    kept = search(SearchConfig(**COMMON, max_steps=3, keep_checkpoint=True, out=str(tmp_path / "kept")))
    assert sorted(p.name for p in plain.run_dir.iterdir()) == [
        "artifact.safetensors",
        "config.json",
        "metrics.csv",
        "metrics.jsonl",
    ]
    assert sorted(p.name for p in kept.run_dir.iterdir()) == [
        "artifact.safetensors",
        "checkpoint.safetensors",
        "config.json",
        "metrics.csv",
        "metrics.jsonl",
    ]
    assert plain.artifact_path.read_bytes() == kept.artifact_path.read_bytes()


def test_extending_a_finished_search_with_its_kept_checkpoint(finished, tmp_path):
    run = _copy(finished, tmp_path)
    before = _files(run)
    result = resume(run, {"epochs": 3})
    metrics = result.metrics
    # epochs 1-2 are the finished search's; epoch 3 follows the 3-epoch cosine from step 16 (docs/SCALE.md)
    recorded = [json.loads(line) for line in (finished / "metrics.jsonl").read_text().splitlines()]
    assert without_timings(metrics[:2]) == without_timings(recorded)
    assert [m["step"] for m in metrics] == [8, 16, 24]
    assert metrics[2]["lr"] == 0.5 * 0.1 * (1 + math.cos(math.pi * (23 / 24)))
    # the old artifact and the export made from it moved to previous-1/, untouched; config records 3 epochs
    assert _files(run / "previous-1") == {name: before[name] for name in ("artifact.onnx", "artifact.safetensors")}
    assert json.loads((run / "config.json").read_text())["epochs"] == 3
    assert result.artifact.document["provenance"]["epochs"] == 3


def test_extending_needs_the_checkpoint_and_cannot_shorten(finished, tmp_path):
    run = _copy(finished, tmp_path)
    (run / "checkpoint.safetensors").unlink()
    before = _files(run)
    with pytest.raises(MaskforgeError) as caught:
        resume(run, {"epochs": 3})
    assert str(caught.value) == (
        f"cannot extend the finished search in {run} to epochs 3: its checkpoint was removed when it finished "
        f"(keep_checkpoint keeps it), and the artifact holds the masks but not the scores and momentum a search "
        f"continues from; start a new search with these arguments instead"
    )
    assert _files(run) == before
    with pytest.raises(
        MaskforgeError, match="make 8 steps, but the checkpoint is at step 16; a search can be extended, not shortened"
    ):
        resume(finished, {"epochs": 1})


# --- item 16: TensorBoard --------------------------------------------------------------------------------


def test_tensorboard_events_hold_the_metrics(tmp_path):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    result = search(SearchConfig(**COMMON, tensorboard=True, out=str(tmp_path / "run")))
    events = event_accumulator.EventAccumulator(str(result.run_dir / "tensorboard"))
    events.Reload()
    for tag, field in (("loss/train", "train_loss"), ("accuracy/heldout", "heldout_acc"), ("lr", "lr")):
        scalars = events.Scalars(tag)
        assert [s.step for s in scalars] == [m["step"] for m in result.metrics]
        assert [s.value for s in scalars] == pytest.approx([m[field] for m in result.metrics], rel=1e-6)  # float32


def test_a_search_that_max_steps_ended_inside_an_epoch_is_not_extended(tmp_path):
    """Its checkpoint counts the cut epoch as done: an extension would skip the rest of that epoch (with
    epochs 1, train nothing at all and still call it extended). Refused, and the folder left as it was."""
    run = tmp_path / "cut"
    search(SearchConfig(**{**COMMON, "epochs": 1}, max_steps=2, keep_checkpoint=True, out=str(run)))
    before = _files(run)
    for longer in ({"max_steps": 6}, {"max_steps": 6, "epochs": 2}):
        with pytest.raises(
            MaskforgeError,
            match=f"cannot extend the search in {run}: max_steps 2 ended it inside "
            f"epoch 1, and a search is extended only from the end of an epoch",
        ):
            resume(run, longer)
        assert _files(run) == before

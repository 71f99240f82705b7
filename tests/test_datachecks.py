"""What the search records about its data and what it warns about (issue 10, items 8, 10, 12).

* `--data` is recorded as an absolute path plus a fingerprint of the held-out split (file list and labels,
  or pixels and labels); eval, from any folder, finds the same data, and warns when they differ.
* Image folders: the image size chosen and why; a held-out split that lacks classes; held-out classes
  that never occur in training; layers where k keeps almost nothing; a large or long search on the CPU.

Oracles: the fingerprint recomputed here from its definition (docs/FORMAT.md, provenance) and from the
files/the vendored demo set; the expected messages written out with counts computed here.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from helpers import demo_rows, write_image_folder, write_mnist_folder
from maskforge.evaluation.measure import load_matching_data
from maskforge.evaluation.subject import open_model
from maskforge.searches import SearchConfig, notices, search

COMMON = dict(arch="fc", epochs=1, max_steps=2, batch_size=64, device="cpu", workers=0)


def _messages(caplog, level: int) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == level and r.name.startswith("maskforge")]


def _folder_fingerprint(root: Path, split: str, classes: list[str]) -> str:
    """The held-out fingerprint of an image folder, from its definition: class names, then per file (sorted
    by class, then name) its path relative to the split folder and its label."""
    digest = hashlib.sha256(b"maskforge/heldout/v1\x00" + json.dumps(classes).encode() + b"\x00")
    for label, name in enumerate(classes):
        for file in sorted((root / split / name).iterdir()):
            digest.update(f"{name}/{file.name}\t{label}\n".encode())
    return digest.hexdigest()


def test_data_is_recorded_as_an_absolute_path_with_a_fingerprint(tmp_path, monkeypatch):
    write_image_folder(tmp_path / "images", 8)
    monkeypatch.chdir(tmp_path)
    result = search(SearchConfig(**COMMON, data="images", out="run"))
    assert json.loads((tmp_path / "run" / "config.json").read_text())["data"] == str(tmp_path / "images")
    provenance = result.artifact.document["provenance"]
    assert provenance["data"] == str(tmp_path / "images")
    assert provenance["heldout_digest"] == _folder_fingerprint(tmp_path / "images", "val", ["dark", "light"])


def test_the_demo_set_is_recorded_by_name_and_pixel_digest(tmp_path):
    result = search(SearchConfig(**COMMON, out=str(tmp_path / "run")))
    _, _, images, labels = demo_rows()
    digest = hashlib.sha256(b"maskforge/heldout/v1\x00" + json.dumps([str(d) for d in range(10)]).encode() + b"\x00")
    digest.update(
        b"pixels [1000, 1, 28, 28]\x00"
        + np.ascontiguousarray(images, np.uint8).tobytes()
        + labels.astype("<i8").tobytes()
    )
    provenance = result.artifact.document["provenance"]
    assert (provenance["data"], provenance["heldout_digest"]) == ("mnist5k", digest.hexdigest())


def test_eval_from_another_folder_finds_the_data_and_warns_when_it_changed(tmp_path, monkeypatch, caplog):
    write_image_folder(tmp_path / "images", 8)
    monkeypatch.chdir(tmp_path)
    artifact = search(SearchConfig(**COMMON, data="images", out="run")).artifact_path.resolve()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # "images" does not exist here: the recorded path must be absolute
    with caplog.at_level(logging.WARNING, logger="maskforge"):
        splits, source = load_matching_data(open_model(artifact), None)
    assert source == str(tmp_path / "images") and len(splits.heldout) == 16
    assert _messages(caplog, logging.WARNING) == []
    # The held-out data change (an image more): eval says so.
    shutil.copy(tmp_path / "images" / "val" / "dark" / "0.png", tmp_path / "images" / "val" / "dark" / "extra.png")
    with caplog.at_level(logging.WARNING, logger="maskforge"):
        load_matching_data(open_model(artifact), None)
    now = _folder_fingerprint(tmp_path / "images", "val", ["dark", "light"])
    [warning] = _messages(caplog, logging.WARNING)
    assert warning.startswith(
        f"the held-out data of {tmp_path / 'images'} differ from those the model was searched "
        f"with ({tmp_path / 'images'}; held-out digest "
    )
    assert warning.endswith(f"now {now[:12]}...): its accuracy here is not comparable with the search's")


def test_image_folder_notices_and_warnings(tmp_path, caplog):
    root = write_image_folder(tmp_path / "images", 8)
    for split, count in (("train", 8), ("val", 0)):  # a third class that val/ lacks
        (root / split / "mid").mkdir()
        for i in range(count):
            shutil.copy(root / "train" / "dark" / f"{i}.png", root / split / "mid" / f"{i}.png")
    with caplog.at_level(logging.INFO, logger="maskforge"):
        search(SearchConfig(**COMMON, data=str(root), k=0.01, out=str(tmp_path / "run")))
    infos, warnings = _messages(caplog, logging.INFO), _messages(caplog, logging.WARNING)
    assert infos[0] == (
        f"image folder {root}: images are decoded at 8x8 RGB, the size of its first training image "
        f"0.png (8x8; images of at most 64 px keep their size); set image_size to choose another"
    )
    # fc on 3x8x8 images, 3 classes: 192x300, 300x100, 100x3; k = 0.01 keeps 3 of the last layer's 300
    assert warnings == [
        f"the held-out split of {root} has no images of class(es) mid that training has: their accuracy is not "
        f"measured",
        "k 0.01 keeps fewer than 5 weights in 1 layer(s) (5 keeps 3 of 300): such a layer can pass almost nothing "
        "on; a larger k keeps more",
    ]


def test_heldout_classes_never_seen_in_training(tmp_path, caplog):
    # the first 256 training images of the demo set are all zeros; the first 200 held-out ones are zeros and ones
    data = write_mnist_folder(tmp_path / "mnist", 256, 200)
    _, train_y, _, test_y = demo_rows()
    unseen = sorted(set(test_y[:200].tolist()) - set(train_y[:256].tolist()))
    share = np.isin(test_y[:200], unseen).mean()
    with caplog.at_level(logging.WARNING, logger="maskforge"):
        search(SearchConfig(**COMMON, data=str(data), out=str(tmp_path / "run")))
    assert _messages(caplog, logging.WARNING) == [
        f"the held-out split of {data} has class(es) {', '.join(map(str, unseen))} that never occur in training "
        f"({share:.0%} of its images): the search cannot learn them"
    ]


def test_a_large_network_on_the_cpu_is_said_once_with_what_to_do(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(notices, "LARGE_ON_CPU", 1000)  # fc's 266,200 weights count as large here
    with caplog.at_level(logging.WARNING, logger="maskforge"):
        search(SearchConfig(**COMMON, out=str(tmp_path / "large")))
    assert _messages(caplog, logging.WARNING) == [
        "fc has 0.3 M weights and runs on the CPU, where a search of it is slow (hours per epoch on large data): use "
        "a GPU (--device cuda), a smaller --max-steps, or search a smaller --arch (see `maskforge archs`)"
    ]
    caplog.clear()
    # not large, but long: said once, after the estimate of the first steps
    monkeypatch.setattr(notices, "LARGE_ON_CPU", 10**9)
    monkeypatch.setattr(notices, "LONG_ON_CPU_SECONDS", 0.0)
    with caplog.at_level(logging.INFO, logger="maskforge"):
        search(SearchConfig(**{**COMMON, "max_steps": None, "batch_size": 500}, out=str(tmp_path / "long")))
    [estimate] = [m for m in _messages(caplog, logging.INFO) if m.startswith("estimated time")]
    # 8 steps; the first is not timed, the next 2 are: estimated after step 3, for the 5 that remain
    assert re.fullmatch(
        r"estimated time: about \d+ s for the remaining 5 steps \(\S+ s per step on cpu, held-out "
        r"evaluations included\)",
        estimate,
    ), estimate
    [warning] = _messages(caplog, logging.WARNING)
    assert warning.startswith("this search would take about ") and warning.endswith(
        " on the CPU: use a GPU (--device cuda), bound the search with --max-steps, or search a smaller --arch (see "
        "`maskforge archs`)"
    )


@pytest.mark.parametrize(
    "seconds,text",
    [
        (0.4, "0 s"),
        (59.6, "1 min 00 s"),
        (3599, "59 min 59 s"),
        (3600 * 5 + 61, "5 h 01 min"),
        (86400 * 3 + 3600 * 4, "3 d 04 h"),
    ],
)
def test_durations_read_as_people_write_them(seconds, text):
    assert notices.format_duration(seconds) == text

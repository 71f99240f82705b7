"""Hostile inputs and faults (issue 17, section 3): each case failed before its fix.

Every case is a file an attacker (or an accident) can hand to maskforge; the contract is the one of every
user error: one `error:` line on stderr, exit 2, nothing printed that the file chose (terminal escapes,
megabytes of text), and no hang.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from eval_helpers import searched_fc
from maskforge.artifact import load_artifact, save_artifact
from maskforge.cli import app
from maskforge.errors import MaskforgeError

ESC = "\x1b"


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    return searched_fc(tmp_path_factory.mktemp("hostile"), steps=3)


def _cli(*args: str):
    return CliRunner().invoke(app, [str(arg) for arg in args])


def _one_error_line(result, code: int = 2) -> str:
    assert result.exit_code == code, (result.exit_code, result.stdout[-2000:], result.stderr[-2000:])
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[:2000]
    return lines[0]


def _header_and_body(path: Path) -> tuple[dict, bytes]:
    data = path.read_bytes()
    size = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + size]), data[8 + size :]


def _assemble(header: bytes, body: bytes) -> bytes:
    return len(header).to_bytes(8, "little") + header + body


# ---------------------------------------------------------------------------------------------------------
# 3.3 terminal escapes from a correctly sealed artifact
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def escaping(run, tmp_path_factory) -> Path:
    """A correctly sealed artifact whose class names and provenance hold terminal escapes and markup."""
    artifact = load_artifact(run / "artifact.safetensors")
    names = list(artifact.document["input"]["class_names"])
    names[0] = f"zero{ESC}[2J{ESC}]0;owned\x07"
    names[1] = "[bold red]one[/]"
    artifact.document["input"]["class_names"] = names
    artifact.document["provenance"]["data"] = f"mnist{ESC}[31mred"
    path = save_artifact(artifact, tmp_path_factory.mktemp("esc") / "artifact.safetensors")
    load_artifact(path)  # valid: the seal and the schema accept it
    return path


def test_inspect_shows_escapes_as_text_and_json_keeps_them(escaping):
    result = _cli("inspect", escaping)
    assert result.exit_code == 0, result.stderr
    assert ESC not in result.stdout and "\x07" not in result.stdout
    assert "\\x1b[2J" in result.stdout and "[bold red]one[/]" in result.stdout
    assert "mnist\\x1b[31mred" in result.stdout
    exact = json.loads(_cli("inspect", escaping, "--json").stdout)
    assert exact["input"]["class_names"][0] == f"zero{ESC}[2J{ESC}]0;owned\x07"


def test_predict_shows_escapes_as_text(escaping, run, tmp_path):
    from PIL import Image

    Image.fromarray(np.zeros((28, 28), dtype=np.uint8), "L").save(tmp_path / "x.png")
    result = _cli("predict", escaping, tmp_path / "x.png", "--top", "10")
    assert result.exit_code == 0, result.stderr
    assert ESC not in result.stdout and "\\x1b[2J" in result.stdout and "[bold red]one[/]" in result.stdout
    exact = json.loads(_cli("predict", escaping, tmp_path / "x.png", "--top", "10", "--json").stdout)
    assert f"zero{ESC}[2J{ESC}]0;owned\x07" in {s["name"] for s in exact["predictions"][0]["top"]}


def test_error_lines_show_escapes_as_text(run, tmp_path):
    """A message that quotes a file (here a key of the header) never carries the file's escapes."""
    header, body = _header_and_body(run / "artifact.safetensors")
    header["__metadata__"][f"x{ESC}[2J"] = "1"
    path = tmp_path / "a.safetensors"
    path.write_bytes(_assemble(json.dumps(header).encode(), body))
    line = _one_error_line(_cli("inspect", path))
    assert ESC not in line and "x\\x1b[2J" in line


def test_printable_escapes_controls_and_bidi_and_cuts():
    from maskforge.textguard import printable, quote

    assert printable(f"a{ESC}b\x9bc\u202ed\te\n") == "a\\x1bb\\x9bc\\u202ed\\x09e\\x0a"
    assert printable("é 猫 ok") == "é 猫 ok"
    assert printable("x" * 10, limit=4) == "xxxx…"
    assert quote("y" * 1000) == repr("y" * 200) + "…"
    assert quote(f"{ESC}") == "'\\x1b'"


# ---------------------------------------------------------------------------------------------------------
# 3.4 bounded error text
# ---------------------------------------------------------------------------------------------------------

HUGE = "A" * 2_000_000


def _huge_cases(run: Path) -> dict[str, bytes]:
    header, body = _header_and_body(run / "artifact.safetensors")
    document = json.loads(header["__metadata__"]["maskforge"])

    def with_document(change) -> bytes:
        changed = json.loads(json.dumps(document))
        change(changed)
        h = dict(header, __metadata__={"maskforge": json.dumps(changed)})
        return _assemble(json.dumps(h).encode(), body)

    def with_header(change) -> bytes:
        h = json.loads(json.dumps(header))
        change(h)
        return _assemble(json.dumps(h).encode(), body)

    name = next(k for k in header if k != "__metadata__")
    return {
        "unknown field": with_document(lambda d: d.__setitem__(HUGE, 1)),
        "format": with_document(lambda d: d.__setitem__("format", HUGE)),
        "arch name": with_document(lambda d: d["arch"].__setitem__("name", HUGE)),
        "metadata key": with_header(lambda h: h["__metadata__"].__setitem__(HUGE, "x")),
        "dtype": with_header(lambda h: h[name].__setitem__("dtype", HUGE)),
        "tensor name": with_header(lambda h: h.__setitem__(HUGE, dict(h[name]))),
        "duplicate key": _assemble(b'{"' + HUGE.encode() + b'":1,"' + HUGE.encode() + b'":2}', body),
    }


def test_error_messages_quote_at_most_a_few_hundred_characters_of_a_file(run, tmp_path):
    for case, data in _huge_cases(run).items():
        path = tmp_path / f"{case.replace(' ', '_')}.safetensors"
        path.write_bytes(data)
        with pytest.raises(MaskforgeError) as caught:
            load_artifact(path)
        assert len(str(caught.value)) < 1000, (case, str(caught.value)[:300])
    line = _one_error_line(_cli("inspect", tmp_path / "unknown_field.safetensors"))
    assert len(line) < 1000 and "…" in line


def test_the_cli_caps_any_error_line():
    """The last line of defence: whatever a message holds, the error line stays short."""
    from maskforge.textguard import MESSAGE_LIMIT

    result = _cli("inspect", "x" * 5000 + ".safetensors")
    line = _one_error_line(result)
    assert len(line) <= len("error: ") + MESSAGE_LIMIT + 1 and line.endswith("…")


# ---------------------------------------------------------------------------------------------------------
# 3.5 deeply nested JSON in a header
# ---------------------------------------------------------------------------------------------------------


def test_deeply_nested_header_is_one_error_line_everywhere(run, tmp_path):
    header, body = _header_and_body(run / "artifact.safetensors")
    raw = json.dumps(header).encode()
    depth = 1_000_000
    nested = tmp_path / "nested.safetensors"
    nested.write_bytes(_assemble(b'{"x":' + b"[" * depth + b"]" * depth + b"," + raw[1:], body))
    image = tmp_path / "x.png"
    from PIL import Image

    Image.fromarray(np.zeros((28, 28), dtype=np.uint8), "L").save(image)
    for command in (
        ["inspect", nested],
        ["verify", nested],
        ["export", nested, "--out", tmp_path / "m.onnx"],
        ["eval", nested],
        ["predict", nested, image],
    ):
        line = _one_error_line(_cli(*command))
        assert "nested.safetensors" in line and "bug" not in line, (command, line)


# ---------------------------------------------------------------------------------------------------------
# 3.1 symlink loops and duplicates in image folders
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture
def folder(tmp_path) -> Path:
    from helpers import write_image_folder

    return write_image_folder(tmp_path / "data", train_per_class=4, val_per_class=2)


def test_a_symlink_back_up_the_tree_is_refused_not_repeated(folder):
    """One `..` link used to repeat the training set 41 times (until the OS's 40-link limit), silently."""
    from maskforge.data import load_data

    (folder / "train" / "dark" / "up").symlink_to("..", target_is_directory=True)
    with pytest.raises(MaskforgeError, match=r"symbolic link loop: .*train/dark/up leads back to .*train"):
        load_data(str(folder))


@pytest.mark.slow  # a fresh interpreter (about 15 s on 2 busy cores): before the fix it hung, so not in-process
def test_two_links_up_the_tree_do_not_hang(folder):
    """Two `..` links made the listing exponential (a search hung for ever, holding its lock)."""
    import subprocess
    import sys

    for name in ("up1", "up2"):
        (folder / "train" / "dark" / name).symlink_to("..", target_is_directory=True)
    code = f"from maskforge.data import load_data; load_data({str(folder)!r})"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "symbolic link loop" in done.stderr.splitlines()[-1], done.stderr[-500:]


def test_a_class_reached_twice_is_refused_as_a_duplicate(folder):
    from maskforge.data import load_data

    (folder / "train" / "light" / "more").symlink_to(folder / "train" / "dark", target_is_directory=True)
    with pytest.raises(MaskforgeError, match=r"train/light/more and .*train/dark are the same folder"):
        load_data(str(folder))
    (folder / "train" / "light" / "more").unlink()
    (folder / "train" / "light" / "again.png").symlink_to(folder / "train" / "dark" / "0.png")
    with pytest.raises(MaskforgeError, match=r"train/light/again.png and .*train/dark/0.png are the same file"):
        load_data(str(folder))


def test_plain_symlinks_still_work_in_the_same_order_as_torchvision(folder, tmp_path):
    """A class folder that is a link to storage elsewhere is fine; the order is torchvision's."""
    from torchvision.datasets.folder import make_dataset

    from maskforge.data import load_data

    shared = tmp_path / "shared"
    (folder / "train" / "dark").rename(shared)
    (folder / "train" / "dark").symlink_to(shared, target_is_directory=True)
    (shared / "sub" / "deeper").mkdir(parents=True)
    for name in ("sub/b.png", "sub/deeper/a.png", "z.PNG"):
        (shared / name).write_bytes((shared / "0.png").read_bytes())
    (shared / ".hidden").mkdir()
    (shared / ".hidden" / "x.png").write_bytes(b"skipped")
    (shared / "notes.txt").write_text("skipped")
    splits = load_data(str(folder))
    expected = [
        Path(p)
        for p, _ in make_dataset(
            str(folder / "train"),
            {"dark": 0, "light": 1},
            is_valid_file=lambda p: p.lower().endswith(".png") and "/." not in p,
        )
    ]
    assert splits.train.files == expected and len(expected) == 4 + 3 + 4


def test_a_self_looping_symlink_is_not_reported_as_missing(run, tmp_path):
    from maskforge.data import load_data

    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    with pytest.raises(MaskforgeError, match=r"loop is a symbolic link that loops"):
        load_data(str(loop))
    for command in (
        ["predict", run / "model.onnx", loop],
        ["predict", loop, run / "model.onnx"],
        ["eval", loop],
        ["inspect", loop],
    ):
        line = _one_error_line(_cli(*command))
        assert "symbolic link that loops" in line or "Too many levels of symbolic links" in line, (command, line)
    dangling = tmp_path / "dangling.png"
    dangling.symlink_to(tmp_path / "gone.png")
    line = _one_error_line(_cli("predict", run / "model.onnx", dangling))
    assert f"is a broken symbolic link (to {tmp_path / 'gone.png'}, which does not exist)" in line, line


# ---------------------------------------------------------------------------------------------------------
# 3.6 metrics.jsonl records validated; 3.9 the line number, a duplicate key in config.json
# ---------------------------------------------------------------------------------------------------------

TINY = {"arch": "fc", "epochs": 1, "max_steps": 2, "batch_size": 64, "device": "cpu"}


def _records(run: Path) -> list[str]:
    return (run / "metrics.jsonl").read_text().splitlines()


@pytest.mark.parametrize(
    "damage, message",
    [
        ("{}", r"metrics.jsonl line 2: metrics record: field \w+ is missing"),
        ("[1, 2]", r"metrics.jsonl line 2: metrics record: .*must be an object"),
        ("epoch-two", r"metrics.jsonl line 2: metrics record: epoch must be an integer, got 'two'"),
        ("truncated", r"metrics.jsonl line 2: .*is not valid JSON"),
    ],
)
def test_damaged_metrics_records_are_refused_with_their_line(run, tmp_path, damage, message):
    import shutil

    from maskforge.figures import plot_run
    from maskforge.metricfiles import read_metrics

    copy = Path(shutil.copytree(run, tmp_path / "run"))
    good = _records(run)[0]
    bad = {"epoch-two": good.replace('"epoch": 1', '"epoch": "two"'), "truncated": good[:30]}.get(damage, damage)
    assert bad != good
    (copy / "metrics.jsonl").write_text(good + "\n" + bad + "\n")
    with pytest.raises(MaskforgeError, match=message):
        read_metrics(copy)
    line = _one_error_line(_cli("plot", copy))
    assert re.search(message, line), line
    assert not (copy / "curves.png").exists()
    assert plot_run  # the library refuses the same way (through read_metrics)


def test_a_damaged_point_is_reported_by_collect_and_run_again_by_the_sweep(tmp_path):
    from maskforge.sweeps import collect_sweep, sweep

    out = tmp_path / "grid"
    first = sweep(out, {**TINY, "k": [0.3, 0.5]}, figures=False)
    assert first.ok and len(first.ran) == 2
    damaged = out / first.ran[0]
    (damaged / "metrics.jsonl").write_text("{}\n")
    collected = collect_sweep(out, figures=False)
    row = next(r for r in collected.rows if r["point"] == first.ran[0])
    assert row["status"] == "failed" and "metrics.jsonl line 1" in row["error"], row
    result = _cli("sweep", "--collect", out)
    assert result.exit_code != 0 and "bug" not in result.output + result.stderr
    again = sweep(out, {**TINY, "k": [0.3, 0.5]}, figures=False)
    assert again.ran == [first.ran[0]] and again.skipped == [first.ran[1]] and again.ok, again
    assert list(damaged.glob("previous-*/metrics.jsonl"))  # the damaged files were kept aside, not deleted
    assert len(_records(damaged)) == 1 and json.loads(_records(damaged)[0])["epoch"] == 1


def test_a_duplicate_key_in_config_json_is_refused(run, tmp_path):
    import shutil

    from maskforge.searches.folders import read_run_config

    copy = Path(shutil.copytree(run, tmp_path / "run"))
    text = (copy / "config.json").read_text()
    (copy / "config.json").write_text(text.replace('"k": 0.5', '"k": 0.5, "k": 0.9'))
    with pytest.raises(MaskforgeError, match=r"config.json: the search config has the key 'k' twice"):
        read_run_config(copy)


# ---------------------------------------------------------------------------------------------------------
# 3.8 one bad image does not abort predict or eval; predict takes a folder
# ---------------------------------------------------------------------------------------------------------


def _png(path: Path, value: int) -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((28, 28), value, dtype=np.uint8), "L").save(path)
    return path


def test_predict_reports_bad_images_classifies_the_rest_and_exits_2(run, tmp_path):
    from maskforge.prediction import predict

    good = [_png(tmp_path / "a.png", 30), _png(tmp_path / "c.png", 200)]
    bad = tmp_path / "b.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    images = [good[0], bad, good[1]]
    alone = {p.image: p.top for p in predict(run / "model.onnx", good)}
    result = _cli("predict", run / "model.onnx", *images, "--json")
    assert result.exit_code == 2, result.stderr
    document = json.loads(result.stdout)
    assert [p["image"] for p in document["predictions"]] == [str(good[0]), str(good[1])]
    for p in document["predictions"]:
        assert [s["index"] for s in p["top"]] == [s.index for s in alone[p["image"]]]
    assert document["failed"] == [{"image": str(bad), "error": document["failed"][0]["error"]}]
    assert "cannot decode image" in document["failed"][0]["error"]
    lines = result.stderr.splitlines()
    assert lines[0].startswith(f"warning: cannot decode image {bad}")
    assert lines[-1] == "error: 1 of 3 images could not be decoded (see the warnings above); the other 2 are classified"
    table = _cli("predict", run / "model.onnx", *images)
    assert table.exit_code == 2 and "maskforge predict" in table.stdout and "b.jpg" not in table.stdout
    assert table.stderr.splitlines()[-1] == lines[-1]
    with pytest.raises(MaskforgeError, match="cannot decode image"):
        predict(run / "model.onnx", images)  # the library raises unless asked to skip
    skipped = predict(run / "model.onnx", images, skip_bad=True)
    assert [p.error is not None for p in skipped] == [False, True, False]


def test_predict_takes_a_folder_recursively_in_sorted_order(run, tmp_path):
    folder = tmp_path / "imgs"
    files = [
        _png(folder / name, value)
        for name, value in (("b.png", 10), ("a/z.png", 90), ("a/b/y.png", 250), ("c.PNG", 128))
    ]
    (folder / "notes.txt").write_text("not an image")
    _png(folder / ".hidden" / "x.png", 1)
    result = _cli("predict", run / "model.onnx", folder, "--json")
    assert result.exit_code == 0, result.stderr
    listed = [p["image"] for p in json.loads(result.stdout)["predictions"]]
    # the order of an image folder (torchvision's): folder by folder in sorted path order, names sorted within
    assert listed == [str(folder / "b.png"), str(folder / "c.PNG"), str(folder / "a/z.png"), str(folder / "a/b/y.png")]
    assert sorted(listed) == sorted(map(str, files))
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "contains no images" in _one_error_line(_cli("predict", run / "model.onnx", empty))


def test_eval_counts_the_readable_images_and_exits_2_naming_the_bad_ones(tmp_path):
    from helpers import write_image_folder

    from maskforge.searches import SearchConfig, search

    root = write_image_folder(tmp_path / "data", train_per_class=8, val_per_class=4)
    out = tmp_path / "run"
    search(SearchConfig(arch="fc", k=0.5, epochs=1, max_steps=2, batch_size=8, data=str(root), out=str(out)))
    bad = root / "val" / "dark" / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    result = _cli("eval", out / "artifact.safetensors", "--data", root, "--json", "-", "--no-latency")
    assert result.exit_code == 2, result.stderr
    report = json.loads(result.stdout)
    assert report["accuracy"]["examples"] == 8
    assert report["accuracy"]["unreadable"] == [
        {"image": str(bad), "error": report["accuracy"]["unreadable"][0]["error"]}
    ]
    assert result.stderr.splitlines()[-1] == (
        "error: 1 of 9 test images could not be decoded (see the warnings above); the accuracy counts the other 8"
    )
    assert any(line.startswith(f"warning: cannot decode image {bad}") for line in result.stderr.splitlines())


# ---------------------------------------------------------------------------------------------------------
# 3.9 the int8 full-disk message; stale temporaries of a killed write
# ---------------------------------------------------------------------------------------------------------


def test_int8_export_with_a_full_temporary_folder_names_the_users_file(run, tmp_path, monkeypatch):
    import errno
    import os
    import tempfile

    from maskforge.export import Int8Options, export_onnx

    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    real = Path.write_bytes

    def full(self, data):
        if scratch in Path(self).resolve().parents:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(self, data)

    monkeypatch.setattr(Path, "write_bytes", full)
    out = tmp_path / "m.int8.onnx"
    with pytest.raises(MaskforgeError) as caught:
        export_onnx(
            run / "artifact.safetensors", out, precision="int8", int8=Int8Options(calibration=16, check_images=32)
        )
    message = str(caught.value)
    assert message.startswith(f"cannot write {out}: ") and "fp32.onnx" not in message, message
    assert "the disk is full" in message and "TMPDIR" in message and str(scratch) in message, message
    assert not out.exists()


def test_a_killed_writers_temporary_is_removed_by_the_next_write_of_that_file(tmp_path):
    import fcntl

    from maskforge.fileio import atomic_write

    stale = tmp_path / ".model.onnx.k1ll3d_x.tmp"  # what a SIGKILLed export leaves
    stale.write_bytes(b"half a model")
    other = tmp_path / ".other.onnx.k1ll3d_x.tmp"  # another file's: not ours to remove
    other.write_bytes(b"half another model")
    live = tmp_path / ".model.onnx.w0rk1ng_.tmp"  # a writer still running holds its lock
    live.write_bytes(b"being written")
    with open(live, "rb") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        atomic_write(tmp_path / "model.onnx", b"new")
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, other.name, "model.onnx"])
    assert (tmp_path / "model.onnx").read_bytes() == b"new"


# ---------------------------------------------------------------------------------------------------------
# 3.2 a memory bound before building
# ---------------------------------------------------------------------------------------------------------


def test_forward_peak_counts_what_is_alive_at_once():
    """Oracle: the bytes of each layer's output, by hand, and which of them are alive together."""
    import torch
    from torch import nn

    from maskforge.memory import forward_peak_bytes

    conv_out = 2 * 8 * 16 * 16 * 4
    plain = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 16 * 16, 10))
    assert forward_peak_bytes(plain, (2, 1, 16, 16)) == 2 * conv_out  # conv output + ReLU output
    inplace = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(inplace=True), nn.Flatten())
    assert forward_peak_bytes(inplace, (2, 1, 16, 16)) == conv_out  # in place: one buffer

    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)

        def forward(self, x):
            y = self.a(x)
            z = self.b(torch.relu(y))
            return z + y  # y is still alive: y, relu(y), z, then y and the sum

    assert forward_peak_bytes(Residual(), (2, 8, 16, 16)) == 3 * conv_out
    weights = plain[0].weight.detach().clone()
    assert torch.equal(plain[0].weight, weights) and plain[0].weight.device.type == "cpu"  # untouched


def test_forward_peak_of_an_unrunnable_model_is_unknown_not_an_error():
    from torch import nn

    from maskforge.memory import forward_peak_bytes

    class Host(nn.Module):
        def forward(self, x):
            return x.tolist()  # needs real data: no meta run

    assert forward_peak_bytes(Host(), (1, 3)) is None


@pytest.fixture(scope="module")
def huge(tmp_path_factory) -> Path:
    """A valid, small artifact whose network cannot run here: ResNet-18 at 4096x4096 (1 GiB per image for
    its first convolution's output alone)."""
    from maskforge.archs import arch_args, create_model
    from maskforge.artifact import build_artifact
    from maskforge.data import InputSpec

    args = arch_args(3, 10, (4096, 4096))
    spec = InputSpec(3, 4096, 4096, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), tuple("abcdefghij"))
    artifact = build_artifact(
        create_model("resnet18", **args, k=0.5, seed=0),
        arch="resnet18",
        arch_args=args,
        spec=spec,
        seed=0,
        init="signed_constant",
        scale_fan=False,
        k=0.5,
    )
    return save_artifact(artifact, tmp_path_factory.mktemp("huge") / "artifact.safetensors")


def _rgb_folder(root: Path, classes: str) -> Path:
    from PIL import Image

    for split in ("train", "val"):
        for name in classes:
            (root / split / name).mkdir(parents=True)
            Image.fromarray(np.full((8, 8, 3), 40 + 20 * classes.index(name), dtype=np.uint8)).save(
                root / split / name / "0.png"
            )
    return root


_LIMITED = """
import os, resource, sys
import onnx, onnxruntime, torch                      # mapped before the limit is set
import maskforge.export, maskforge.prediction, maskforge.evaluation
from maskforge.cli import main
used = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmSize:"))
resource.setrlimit(resource.RLIMIT_AS, (used + 1536 * 2 ** 20, resource.RLIM_INFINITY))
sys.argv = ["maskforge", *sys.argv[1:]]
main()
"""


@pytest.mark.slow  # fresh interpreters under `ulimit -v`: before the fix each died of a failed allocation
@pytest.mark.parametrize("command", ["export", "predict", "eval"])
def test_a_network_too_large_for_memory_is_refused_before_it_runs(huge, tmp_path, command):
    import os
    import subprocess
    import sys

    image = tmp_path / "x.png"
    from PIL import Image

    Image.fromarray(np.zeros((64, 64, 3), dtype=np.uint8)).save(image)
    argv = {
        "export": ["export", huge, "--out", tmp_path / "m.onnx"],
        "predict": ["predict", huge, image],
        "eval": ["eval", huge, "--data", _rgb_folder(tmp_path / "data", "abcdefghij"), "--no-latency"],
    }[command]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", _LIMITED, *map(str, argv)], capture_output=True, text=True, timeout=300, env=env
    )
    lines = done.stderr.splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr[-2000:]
    assert re.search(r"needs about \d+\.\d GiB of memory for the activations of \d+ 3x4096x4096 input", lines[0]), (
        lines[0]
    )
    assert "available" in lines[0] and not (tmp_path / "m.onnx").exists()


def test_the_memory_check_refuses_in_process_and_lets_a_fitting_network_through(run, monkeypatch, tmp_path):
    """The same refusal without a subprocess, on the demo MLP, with the available memory set by hand below
    its needs (its largest layer outputs 300 floats per image)."""
    import maskforge.memory as memory
    from maskforge.export import export_onnx
    from maskforge.prediction import predict

    artifact, image = run / "artifact.safetensors", _png(tmp_path / "x.png", 7)
    monkeypatch.setattr(memory, "available_bytes", lambda: 1000)
    with pytest.raises(
        MaskforgeError,
        match=r"needs about [\d.]+ KiB of memory for the activations of 4 1x28x28 "
        r"inputs .*more than the 1000 bytes available; use a machine",
    ):
        export_onnx(artifact, tmp_path / "m.onnx")
    with pytest.raises(MaskforgeError, match=r"of 1 1x28x28 input \(.*available; use a machine"):
        predict(artifact, [image])
    with pytest.raises(MaskforgeError, match=r"of 2 1x28x28 inputs .*give fewer images at once"):
        predict(artifact, [image, image])
    assert not (tmp_path / "m.onnx").exists()
    monkeypatch.setattr(memory, "available_bytes", lambda: 64 * 2**20)
    assert predict(artifact, [image, image]) and export_onnx(artifact, tmp_path / "m.onnx").path.exists()


def test_deeply_nested_onnx_metadata_is_one_error_line(run, tmp_path):
    """The ONNX metadata maskforge reads (preprocessing, class names) goes through the same strict reader."""
    import onnx

    proto = onnx.load(str(run / "model.onnx"))
    for prop in proto.metadata_props:
        if prop.key == "maskforge.preprocessing":
            prop.value = "[" * 1_000_000 + "]" * 1_000_000
    path = tmp_path / "nested.onnx"
    onnx.save(proto, str(path))
    image = _png(tmp_path / "x.png", 3)
    for command in (["predict", path, image], ["eval", path, "--no-latency"]):
        line = _one_error_line(_cli(*command))
        assert "metadata is corrupt" in line and "bug" not in line, (command, line)

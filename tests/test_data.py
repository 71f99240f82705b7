"""Tests for maskforge.data: every loader is checked against data the test writes itself (or against the
vendored file read independently), and the batching/transform contracts against hand computations."""

from __future__ import annotations

import gzip
import hashlib
import json
import math
import pickle
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import maskforge
from maskforge.data import (
    DataSplits,
    ImageFileDataset,
    InMemoryImages,
    InputSpec,
    augment_batch,
    iterate_batches,
    load_data,
    normalize,
    num_batches,
)
from maskforge.errors import MaskforgeError

VENDORED = Path(maskforge.__file__).parent / "_data" / "mnist5k.npz"


# ---------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------


def _indexed_dataset(n: int) -> InMemoryImages:
    """Image i is filled with i % 256 and labelled i, so a batch tells which examples it holds."""
    images = (torch.arange(n) % 256).to(torch.uint8).view(n, 1, 1, 1).expand(n, 1, 2, 2).contiguous()
    return InMemoryImages(images, torch.arange(n))


def _documented_order(n: int, *, seed: int, epoch: int) -> list[int]:
    """The recipe of docs/SCALE.md, written out: randperm seeded with SHA-256("maskforge/order/v1" 0 seed 0 epoch)."""
    digest = hashlib.sha256(b"maskforge/order/v1\x00%d\x00%d" % (seed, epoch)).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))
    return torch.randperm(n, generator=generator).tolist()


def _message(fn, *args, **kwargs) -> str:
    """The MaskforgeError message `fn` raises (the test fails if it raises nothing)."""
    with pytest.raises(MaskforgeError) as caught:
        fn(*args, **kwargs)
    return str(caught.value)


def _labels_of(batches) -> list[int]:
    return [int(v) for _, y in batches for v in y]


def _np_mean_std(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Oracle: per-channel mean/population std of pixel/255 over [N, C, H, W], in float64."""
    x = images.astype(np.float64) / 255.0
    return x.mean(axis=(0, 2, 3)), x.std(axis=(0, 2, 3))


# ---------------------------------------------------------------------------------------------------------
# mnist5k
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mnist5k() -> DataSplits:
    return load_data("mnist5k")


@pytest.fixture(scope="module")
def vendored():
    with np.load(VENDORED, allow_pickle=False) as npz:
        return npz["images"], npz["labels"]


def test_mnist5k_split_sizes_balance_and_spec(mnist5k, vendored):
    assert (mnist5k.kind, mnist5k.name, mnist5k.augment) == ("mnist5k", "mnist5k", False)
    assert len(mnist5k.train) == 4000 and len(mnist5k.heldout) == 1000
    assert torch.bincount(mnist5k.train.labels, minlength=10).tolist() == [400] * 10
    assert torch.bincount(mnist5k.heldout.labels, minlength=10).tolist() == [100] * 10
    spec = mnist5k.spec
    assert (spec.channels, spec.height, spec.width, spec.num_classes) == (1, 28, 28, 10)
    assert spec.class_names == tuple(str(d) for d in range(10))
    x, label = mnist5k.train[0]
    assert x.dtype == torch.uint8 and x.shape == (1, 28, 28) and isinstance(label, int)

    images, _ = vendored
    train_rows = np.array([i for i in range(len(images)) if i % 5 != 4])
    mean, std = _np_mean_std(images[train_rows][:, None])
    assert spec.mean == pytest.approx(mean.tolist(), abs=1e-6)
    assert spec.std == pytest.approx(std.tolist(), abs=1e-6)
    assert spec.mean == tuple(round(m, 6) for m in spec.mean)  # stored rounded


def test_mnist5k_splits_are_disjoint_rows_of_the_file(mnist5k, vendored):
    images, labels = vendored
    rows_of: dict[bytes, list[int]] = {}
    for i, image in enumerate(images):
        rows_of.setdefault(image.tobytes(), []).append(i)

    def rows(dataset):
        out = set()
        for image, label in zip(dataset.images, dataset.labels):
            candidates = rows_of[image.numpy().tobytes()]
            assert any(labels[r] == label for r in candidates)
            out.update(candidates)
        return out

    train, heldout = rows(mnist5k.train), rows(mnist5k.heldout)
    assert not train & heldout
    assert train | heldout == set(range(5000))
    assert heldout == {i for i in range(5000) if i % 5 == 4}


# ---------------------------------------------------------------------------------------------------------
# iterate_batches / num_batches
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n,batch_size", [(50, 7), (49, 7), (5, 16), (1, 1)])
def test_eval_iteration_yields_every_example_once_in_order(n, batch_size):
    batches = list(iterate_batches(_indexed_dataset(n), batch_size, shuffle=False))
    assert _labels_of(batches) == list(range(n))
    assert len(batches) == math.ceil(n / batch_size) == num_batches(n, batch_size, drop_last=False)
    for x, y in batches:
        assert x.dtype == torch.uint8 and y.dtype == torch.int64
        assert torch.equal(x[:, 0, 0, 0], (y % 256).to(torch.uint8))


def test_drop_last_keeps_only_full_batches():
    batches = list(iterate_batches(_indexed_dataset(50), 7, shuffle=True, drop_last=True))
    assert [len(y) for _, y in batches] == [7] * 7 == [7] * num_batches(50, 7, drop_last=True)


def test_shuffle_order_is_a_function_of_seed_and_epoch():
    ds = _indexed_dataset(100)
    order = lambda **kw: _labels_of(iterate_batches(ds, 8, shuffle=True, **kw))  # noqa: E731
    assert order(seed=3, epoch=1) == order(seed=3, epoch=1)
    assert order(seed=3, epoch=1) != order(seed=3, epoch=2)
    assert order(seed=3, epoch=1) != order(seed=4, epoch=1)
    assert sorted(order(seed=3, epoch=1)) == list(range(100))
    assert order(seed=3, epoch=1) == _documented_order(100, seed=3, epoch=1)


@pytest.mark.parametrize("world_size", [1, 3])
def test_start_batch_resumes_exactly_where_a_full_epoch_would_be(world_size):
    ds = _indexed_dataset(61)
    kw = dict(shuffle=True, seed=7, epoch=2, world_size=world_size, rank=world_size - 1)
    full = list(iterate_batches(ds, 5, **kw))
    for start in (0, 1, 3, len(full) - 1, len(full), len(full) + 2):
        resumed = list(iterate_batches(ds, 5, start_batch=start, **kw))
        assert len(resumed) == max(0, len(full) - start)
        for (xa, ya), (xb, yb) in zip(full[start:], resumed):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_iteration_rejects_bad_arguments():
    ds = _indexed_dataset(10)
    with pytest.raises(MaskforgeError):
        list(iterate_batches(ds, 0, shuffle=False))
    with pytest.raises(ValueError):
        list(iterate_batches(ds, 2, shuffle=False, rank=2, world_size=2))


# ---------------------------------------------------------------------------------------------------------
# normalize / augment_batch
# ---------------------------------------------------------------------------------------------------------


def test_normalize_matches_hand_computation():
    spec = InputSpec(2, 2, 3, (0.25, 0.5), (0.5, 0.125), ("a", "b"))
    x = torch.tensor([[[[0, 255, 128], [64, 32, 1]], [[10, 20, 30], [200, 100, 0]]]], dtype=torch.uint8)
    expected = np.empty((1, 2, 2, 3))
    for c in range(2):
        for i in range(2):
            for j in range(3):
                expected[0, c, i, j] = (int(x[0, c, i, j]) / 255.0 - spec.mean[c]) / spec.std[c]
    out = normalize(x, spec)
    assert out.dtype == torch.float32 and out.shape == x.shape
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(normalize(x[0], spec, torch.float64).numpy(), expected[0], rtol=1e-12)
    assert normalize(x, spec, torch.float16).dtype == torch.float16


def _windows(image: np.ndarray, padding: int):
    """Oracle: every padded-and-cropped window of `image` [C,H,W], with and without horizontal flip."""
    c, h, w = image.shape
    padded = np.pad(image, ((0, 0), (padding, padding), (padding, padding)))
    for dy in range(2 * padding + 1):
        for dx in range(2 * padding + 1):
            window = padded[:, dy : dy + h, dx : dx + w]
            yield (dy, dx, False), window
            yield (dy, dx, True), window[:, :, ::-1]


def test_augment_batch_is_deterministic_and_crops_shifted_flipped_windows():
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.integers(1, 256, size=(48, 3, 6, 5), dtype=np.uint8))
    out = augment_batch(x, torch.Generator().manual_seed(11), padding=2)
    again = augment_batch(x, torch.Generator().manual_seed(11), padding=2)
    other = augment_batch(x, torch.Generator().manual_seed(12), padding=2)
    assert out.dtype == torch.uint8 and out.shape == x.shape
    assert torch.equal(out, again) and not torch.equal(out, other)
    flips, shifted = set(), set()
    for b in range(len(x)):
        matches = [key for key, win in _windows(x[b].numpy(), 2) if np.array_equal(win, out[b].numpy())]
        assert matches, f"image {b} is not a window of its padded input"
        ((dy, dx, flipped),) = matches  # pixels are >= 1, so padding makes every window unique
        flips.add(flipped)
        shifted.add((dy, dx) != (2, 2))
    assert flips == {True, False} and shifted == {True, False}  # 48 draws see every case


def test_augment_without_padding_only_flips():
    x = torch.arange(2 * 1 * 2 * 3, dtype=torch.uint8).view(2, 1, 2, 3).repeat(20, 1, 1, 1)
    out = augment_batch(x, torch.Generator().manual_seed(0), padding=0)
    for b in range(len(x)):
        assert torch.equal(out[b], x[b]) or torch.equal(out[b], x[b].flip(-1))


# ---------------------------------------------------------------------------------------------------------
# InputSpec
# ---------------------------------------------------------------------------------------------------------


def test_input_spec_round_trips_through_json_and_validates():
    spec = InputSpec(3, 32, 32, (0.49, 0.48, 0.45), (0.25, 0.24, 0.26), ("cat", "dog"))
    d = json.loads(json.dumps(spec.to_dict()))
    assert d == {
        "channels": 3,
        "height": 32,
        "width": 32,
        "mean": [0.49, 0.48, 0.45],
        "std": [0.25, 0.24, 0.26],
        "class_names": ["cat", "dog"],
    }
    assert InputSpec.from_dict(d) == spec and spec.num_classes == 2
    bad = [
        [],
        {**d, "channels": "3"},
        {**d, "channels": True},
        {**d, "height": 0},
        {**d, "mean": [0.5]},
        {**d, "std": [0.2, 0.0, 0.1]},
        {**d, "mean": [0.1, float("nan"), 0.2]},
        {**d, "class_names": "cat"},
        {**d, "class_names": [1, 2]},
        {**d, "extra": 1},
        {k: v for k, v in d.items() if k != "std"},
    ]
    for case in bad:
        with pytest.raises(MaskforgeError):
            InputSpec.from_dict(case)


# ---------------------------------------------------------------------------------------------------------
# CIFAR-10
# ---------------------------------------------------------------------------------------------------------

CIFAR_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _cifar_arrays(seed: int, n: int):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(n, 3072), dtype=np.uint8), rng.integers(0, 10, size=n).tolist()


def _write_cifar_python(folder: Path, per_batch: int = 3) -> dict:
    folder.mkdir(parents=True)
    written = {}
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        data, labels = _cifar_arrays(i, per_batch)
        batch = {b"batch_label": name.encode(), b"labels": labels, b"data": data, b"filenames": [b"x.png"] * per_batch}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
        written[name] = (data, labels)
    meta = {
        b"num_cases_per_batch": per_batch,
        b"label_names": [n.encode() for n in CIFAR_NAMES],
        b"num_vis": 3072,
    }
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    return written


def _check_cifar(splits: DataSplits, written: dict, ext: str = "") -> None:
    train = [written[f"data_batch_{k}{ext}"] for k in range(1, 6)]
    train_x = np.concatenate([d for d, _ in train]).reshape(-1, 3, 32, 32)
    train_y = [label for _, labels in train for label in labels]
    test_x, test_y = written[f"test_batch{ext}"]
    assert splits.kind == "cifar10" and splits.augment is True
    assert np.array_equal(splits.train.images.numpy(), train_x)
    assert splits.train.labels.tolist() == train_y
    assert np.array_equal(splits.heldout.images.numpy(), test_x.reshape(-1, 3, 32, 32))
    assert splits.heldout.labels.tolist() == test_y
    assert splits.spec.class_names == tuple(CIFAR_NAMES)
    assert (splits.spec.channels, splits.spec.height, splits.spec.width) == (3, 32, 32)
    # Channel-major rows: the first 1024 bytes are the red plane.
    assert np.array_equal(splits.train.images[0, 0].numpy().ravel(), train[0][0][0, :1024])
    mean, std = _np_mean_std(train_x)
    assert splits.spec.mean == pytest.approx(mean.tolist(), abs=1e-6)
    assert splits.spec.std == pytest.approx(std.tolist(), abs=1e-6)


def test_cifar10_python_folder_and_its_parent(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    written = _write_cifar_python(folder)
    _check_cifar(load_data(str(folder)), written)
    parent = load_data(str(tmp_path))
    _check_cifar(parent, written)
    assert parent.name == str(tmp_path)


def test_cifar10_pickle_saved_by_modern_python_is_accepted(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    written = _write_cifar_python(folder)
    data, labels = written["test_batch"]
    (folder / "test_batch").write_bytes(pickle.dumps({"data": data, "labels": labels}, protocol=5))
    _check_cifar(load_data(str(folder)), written)


class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_hostile_pickle_is_refused_without_running(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    _write_cifar_python(folder)
    marker = tmp_path / "pwned"
    (folder / "data_batch_3").write_bytes(pickle.dumps({b"data": _Evil(marker), b"labels": []}, protocol=2))
    assert _message(load_data, str(folder)) == (
        f"refusing to load {folder / 'data_batch_3'}: it references posix.system, which a CIFAR-10 batch never "
        f"contains (the file may be malicious)"
    )
    assert not marker.exists()


def test_damaged_cifar_files_are_reported(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    _write_cifar_python(folder)
    (folder / "data_batch_2").write_bytes(b"not a pickle at all")
    assert _message(load_data, str(folder)) == (
        f"cannot read CIFAR-10 file {folder / 'data_batch_2'}: UnpicklingError: invalid load key, 'n'."
    )
    (folder / "data_batch_2").unlink()
    assert _message(load_data, str(folder)) == f"CIFAR-10 file {folder / 'data_batch_2'} is missing"


def test_cifar10_binary_folder(tmp_path):
    folder = tmp_path / "cifar-10-batches-bin"
    folder.mkdir()
    written = {}
    for i, name in enumerate([f"data_batch_{k}.bin" for k in range(1, 6)] + ["test_batch.bin"]):
        data, labels = _cifar_arrays(10 + i, 2 + i)
        with open(folder / name, "wb") as handle:
            for row, label in zip(data, labels):
                handle.write(bytes([label]) + row.tobytes())
        written[name] = (data, labels)
    (folder / "batches.meta.txt").write_text("\n".join(CIFAR_NAMES) + "\n\n")
    _check_cifar(load_data(str(tmp_path)), written, ext=".bin")

    with open(folder / "test_batch.bin", "ab") as handle:
        handle.write(b"\x00" * 10)  # a torn record
    with pytest.raises(MaskforgeError, match="test_batch.bin"):
        load_data(str(folder))


# ---------------------------------------------------------------------------------------------------------
# MNIST IDX
# ---------------------------------------------------------------------------------------------------------


def _idx_bytes(array: np.ndarray) -> bytes:
    return bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def _write_mnist(raw: Path) -> dict:
    raw.mkdir(parents=True)
    rng = np.random.default_rng(1)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (12, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, 12).astype(np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (5, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, 5).astype(np.uint8),
    }
    for i, (name, array) in enumerate(arrays.items()):
        if i % 2:  # mix gzipped and plain files, as torchvision leaves them
            with gzip.open(raw / f"{name}.gz", "wb") as handle:
                handle.write(_idx_bytes(array))
        else:
            (raw / name).write_bytes(_idx_bytes(array))
    return arrays


@pytest.mark.parametrize("which", ["root", "mnist", "raw"])
def test_mnist_raw_folder(tmp_path, which):
    raw = tmp_path / "MNIST" / "raw"
    arrays = _write_mnist(raw)
    source = {"root": tmp_path, "mnist": tmp_path / "MNIST", "raw": raw}[which]
    splits = load_data(str(source))
    assert splits.kind == "mnist" and splits.augment is False
    assert np.array_equal(splits.train.images[:, 0].numpy(), arrays["train-images-idx3-ubyte"])
    assert splits.train.labels.tolist() == arrays["train-labels-idx1-ubyte"].tolist()
    assert np.array_equal(splits.heldout.images[:, 0].numpy(), arrays["t10k-images-idx3-ubyte"])
    assert splits.heldout.labels.tolist() == arrays["t10k-labels-idx1-ubyte"].tolist()
    assert splits.spec.class_names == tuple("0123456789")
    mean, std = _np_mean_std(arrays["train-images-idx3-ubyte"][:, None])
    assert splits.spec.mean == pytest.approx(mean.tolist(), abs=1e-6)
    assert splits.spec.std == pytest.approx(std.tolist(), abs=1e-6)


def test_fashion_mnist_gets_fashion_class_names(tmp_path):
    _write_mnist(tmp_path / "FashionMNIST" / "raw")
    names = load_data(str(tmp_path)).spec.class_names
    assert len(names) == 10 and names[0] == "T-shirt/top" and names[9] == "Ankle boot"


def test_bad_idx_files_are_named(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    arrays = _write_mnist(raw)
    (raw / "t10k-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x01" + b"\x00" * 8)  # wrong magic (1-D)
    with pytest.raises(MaskforgeError, match="t10k-images-idx3-ubyte"):
        load_data(str(tmp_path))
    truncated = _idx_bytes(arrays["t10k-images-idx3-ubyte"])[:-3]
    (raw / "t10k-images-idx3-ubyte").write_bytes(truncated)
    with pytest.raises(MaskforgeError, match="t10k-images-idx3-ubyte"):
        load_data(str(tmp_path))
    (raw / "train-labels-idx1-ubyte.gz").write_bytes(b"garbage, not gzip")
    with pytest.raises(MaskforgeError, match="train-labels-idx1-ubyte.gz"):
        load_data(str(tmp_path))


# ---------------------------------------------------------------------------------------------------------
# image folders
# ---------------------------------------------------------------------------------------------------------


def _png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def _write_image_folder(root: Path, *, rgb: bool, side: int = 8, per_class: int = 3) -> dict:
    rng = np.random.default_rng(2)
    written = {}
    for split, classes in (("train", ["zebra", "ant", "cat"]), ("val", ["cat", "zebra"])):
        for cls in classes:
            for i in range(per_class):
                shape = (side, side, 3) if rgb else (side, side)
                array = rng.integers(0, 256, size=shape, dtype=np.uint8)
                path = root / split / cls / f"img{i}.png"
                _png(path, array)
                written[path] = array
    return written


def test_image_folder_gray(tmp_path):
    written = _write_image_folder(tmp_path, rgb=False)
    (tmp_path / "train" / "ant" / "notes.txt").write_text("not an image")
    splits = load_data(str(tmp_path))
    assert splits.kind == "imagefolder" and splits.augment is True
    assert splits.spec.class_names == ("ant", "cat", "zebra")
    assert (splits.spec.channels, splits.spec.height, splits.spec.width) == (1, 8, 8)
    assert len(splits.train) == 9 and len(splits.heldout) == 6
    for dataset in (splits.train, splits.heldout):
        for i, path in enumerate(dataset.files):
            x, label = dataset[i]
            assert splits.spec.class_names[label] == path.parent.name
            assert np.array_equal(x.numpy()[0], written[path])
    all_train = np.stack([written[p] for p in splits.train.files])[:, None]
    mean, std = _np_mean_std(all_train)  # < 256 images: the sample is the whole split
    assert splits.spec.mean == pytest.approx(mean.tolist(), abs=1e-6)
    assert splits.spec.std == pytest.approx(std.tolist(), abs=1e-6)


def test_image_folder_rgb_batches_through_dataloader(tmp_path):
    written = _write_image_folder(tmp_path, rgb=True)
    splits = load_data(str(tmp_path))
    assert splits.spec.channels == 3
    batches = list(iterate_batches(splits.train, 4, shuffle=True, seed=1, epoch=0))
    perm = _documented_order(9, seed=1, epoch=0)
    assert [len(y) for _, y in batches] == [4, 4, 1]
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    assert x.dtype == torch.uint8 and y.dtype == torch.int64 and x.shape == (9, 3, 8, 8)
    for k, i in enumerate(perm):
        assert np.array_equal(x[k].permute(1, 2, 0).numpy(), written[splits.train.files[i]])
        assert int(y[k]) == int(splits.train.labels[i])
    resumed = list(iterate_batches(splits.train, 4, shuffle=True, seed=1, epoch=0, start_batch=1))
    assert torch.equal(torch.cat([b[0] for b in resumed]), x[4:])
    # Three processes: the last global batch (1 image) leaves ranks 1 and 2 an empty, well-shaped batch.
    shares = [
        list(iterate_batches(splits.train, 3 * 2, shuffle=True, seed=1, epoch=0, rank=r, world_size=3))
        for r in range(3)
    ]
    assert [[len(y) for _, y in batches] for batches in shares] == [[2, 1], [2, 1], [2, 1]]
    last = [
        list(iterate_batches(splits.train, 4, shuffle=True, seed=1, epoch=0, rank=r, world_size=3))[-1]
        for r in range(3)
    ]
    assert [tuple(x.shape) for x, _ in last] == [(1, 3, 8, 8), (0, 3, 8, 8), (0, 3, 8, 8)]
    assert torch.equal(last[0][0], x[8:])


def test_dataloader_workers_give_the_same_batches_and_clear_errors(tmp_path):
    _write_image_folder(tmp_path, rgb=True, per_class=2)
    train = load_data(str(tmp_path)).train
    kw = dict(shuffle=True, seed=2, epoch=1)
    inline = list(iterate_batches(train, 4, workers=0, **kw))
    pooled = list(iterate_batches(train, 4, workers=1, **kw))
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(inline, pooled))
    train.files[3].write_bytes(b"garbage")  # broken after loading: found by the worker
    with pytest.raises(MaskforgeError) as info:
        list(iterate_batches(train, 4, workers=1, shuffle=False))
    message = str(info.value)
    assert train.files[3].name in message and "\n" not in message and "Traceback" not in message


def test_image_folder_resize_shorter_side_then_center_crop(tmp_path):
    rng = np.random.default_rng(3)
    # name: (height, width) of the file, (width, height) after resizing the shorter side to 16 (long side
    # truncated, as torchvision's Resize does), and the crop box's (left, top), rounded as torchvision does.
    cases = {
        "wide.png": ((30, 50), (26, 16), (5, 0)),  # 16*50/30 = 26.7 -> 26; (26-16)/2 = 5
        "tall.png": ((47, 20), (16, 37), (0, 10)),  # 16*47/20 = 37.6 -> 37; round(10.5) = 10 (half to even)
        "square.png": ((20, 20), (16, 16), (0, 0)),
        "exact.png": ((16, 16), None, (0, 0)),  # already 16 x 16: untouched
    }
    for name, ((h, w), _, _) in cases.items():
        _png(tmp_path / "train" / "a" / name, rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    _png(tmp_path / "val" / "a" / "v.png", rng.integers(0, 256, (20, 20, 3), dtype=np.uint8))
    splits = load_data(str(tmp_path), image_size=16)
    assert (splits.spec.height, splits.spec.width) == (16, 16)
    for i, path in enumerate(splits.train.files):
        _, resized, (left, top) = cases[path.name]
        image = Image.open(path).convert("RGB")
        if resized is not None:
            image = image.resize(resized, Image.BILINEAR)
        expected = np.asarray(image)[top : top + 16, left : left + 16]
        assert np.array_equal(splits.train[i][0].permute(1, 2, 0).numpy(), expected), path.name


def test_image_folder_default_size(tmp_path):
    _write_image_folder(tmp_path, rgb=True, side=70, per_class=1)
    assert load_data(str(tmp_path)).spec.height == 224  # max side > 64


def test_corrupt_png_is_reported_with_its_name(tmp_path):
    written = _write_image_folder(tmp_path, rgb=True)
    good = next(iter(written))
    bad = good.with_name("broken.png")
    bad.write_bytes(good.read_bytes()[:60])  # valid header, truncated pixel data
    assert _message(load_data, str(tmp_path)) == f"cannot decode image {bad}: OSError: image file is truncated"
    bad.write_bytes(b"\x89PNG this is not really a png")
    unreadable = f"cannot decode image {bad}: UnidentifiedImageError: cannot identify image file '{bad}'"
    assert _message(load_data, str(tmp_path)) == unreadable
    assert _message(lambda: ImageFileDataset([bad], [0], channels=3, size=8)[0]) == unreadable


def test_decompression_bomb_is_refused(tmp_path):
    _write_image_folder(tmp_path, rgb=False, per_class=1)
    # A hand-made PNG header claiming 20000 x 20000 pixels: refused before any pixel is decoded.
    ihdr = struct.pack(">IIBBBBB", 20000, 20000, 8, 0, 0, 0, 0)

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))
    message = _message(lambda: ImageFileDataset([bomb], [0], channels=1, size=8)[0])
    assert message.startswith(f"refusing to decode image {bomb}: Image size (400000000 pixels) exceeds limit"), message


def test_image_folder_structure_errors(tmp_path):
    _write_image_folder(tmp_path, rgb=False, per_class=1)
    (tmp_path / "val" / "unicorn").mkdir()
    _png(tmp_path / "val" / "unicorn" / "u.png", np.zeros((8, 8), np.uint8))
    assert _message(load_data, str(tmp_path)) == (
        f"{tmp_path / 'val'} has class folder(s) ['unicorn'] that {tmp_path / 'train'} lacks"
    )

    other = tmp_path / "other"
    _write_image_folder(other, rgb=False, per_class=1)
    (other / "train" / "empty").mkdir()
    assert _message(load_data, str(other)) == (
        f"class folder {other / 'train' / 'empty'} contains no images (.png, .jpg, .jpeg, .bmp, .webp, .ppm, .pgm)"
    )

    no_val = tmp_path / "no_val"
    _png(no_val / "train" / "a" / "x.png", np.zeros((8, 8), np.uint8))
    assert _message(load_data, str(no_val)) == (
        f"image folder {no_val} has train/ but no val/ or test/ folder (held-out split)"
    )
    (no_val / "test" / "a").mkdir(parents=True)  # held-out folder without images
    assert _message(load_data, str(no_val)) == (
        f"held-out folder {no_val / 'test'} contains no images (.png, .jpg, .jpeg, .bmp, .webp, .ppm, .pgm)"
    )
    _png(no_val / "test" / "a" / "y.png", np.zeros((8, 8), np.uint8))
    assert len(load_data(str(no_val)).heldout) == 1


# ---------------------------------------------------------------------------------------------------------
# bad sources
# ---------------------------------------------------------------------------------------------------------


def test_bad_sources_are_clear_errors(tmp_path):
    from maskforge.data import ACCEPTED_SOURCES

    assert ACCEPTED_SOURCES.startswith(
        "expected one of: 'mnist5k' (the built-in demo set); 'fashion-mnist' "
        "(Debian's dataset-fashion-mnist or $MASKFORGE_DATA); a CIFAR-10 folder"
    )
    assert (
        _message(load_data, str(tmp_path / "nowhere"))
        == f"data source {tmp_path / 'nowhere'} does not exist; {ACCEPTED_SOURCES}"
    )
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    assert _message(load_data, str(a_file)) == f"data source {a_file} is not a folder; {ACCEPTED_SOURCES}"
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    assert _message(load_data, str(empty)) == f"data source {empty} is not a recognized data folder; {ACCEPTED_SOURCES}"
    assert _message(load_data, "mnist5k", image_size=32) == (
        "image size 32 does not apply to mnist5k: its images are 28x28 (only image folders are resized)"
    )
    assert _message(load_data, "mnist5k", image_size=0) == "image size must be a positive integer, got 0"


# ---------------------------------------------------------------------------------------------------------
# Found from outside: the order's seed (bug 1) and the last partial global batch (bug 5)
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [2**45, 2**63 - 1])
def test_large_seeds_order_the_data(seed):
    ds = _indexed_dataset(30)
    order = _labels_of(iterate_batches(ds, 8, shuffle=True, seed=seed, epoch=4))
    assert sorted(order) == list(range(30))
    assert order == _labels_of(iterate_batches(ds, 8, shuffle=True, seed=seed, epoch=4))


@pytest.mark.parametrize(
    "n,batch_size,world_size",
    [(50, 12, 1), (50, 12, 2), (50, 12, 3), (50, 12, 4), (49, 12, 3), (10, 12, 3), (4000, 128, 2), (2, 12, 3)],
)
def test_global_batches_split_over_ranks(n, batch_size, world_size):
    """`batch_size` is the global batch: step s of N processes holds exactly step s of one process, and
    every example comes once per epoch, the last partial batch included (it may leave a rank empty)."""
    ds = _indexed_dataset(n)
    kw = dict(shuffle=True, seed=5, epoch=1)
    single = [_labels_of([batch]) for batch in iterate_batches(ds, batch_size, **kw)]
    assert [len(b) for b in single] == [batch_size] * (n // batch_size) + ([n % batch_size] if n % batch_size else [])
    assert sorted(v for b in single for v in b) == list(range(n))
    per_rank = [
        [_labels_of([batch]) for batch in iterate_batches(ds, batch_size, rank=r, world_size=world_size, **kw)]
        for r in range(world_size)
    ]
    assert {len(batches) for batches in per_rank} == {len(single)} == {num_batches(n, batch_size)}
    for step, expected in enumerate(single):
        shares = [per_rank[r][step] for r in range(world_size)]
        assert sorted(v for share in shares for v in share) == sorted(expected), step
        assert max(map(len, shares)) - min(map(len, shares)) <= 1  # as even as the batch allows

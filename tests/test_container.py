"""maskforge.container, the file container of artifacts, checkpoints and torch exports: what it writes is
what the format says (checked with an independent reading of the bytes), it reads back what it wrote, and
every seal is checked."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch

from maskforge import container
from maskforge.errors import MaskforgeError


def _header(data: bytes) -> dict:
    n = int.from_bytes(data[:8], "little")
    assert n % 8 == 0
    return json.loads(data[8 : 8 + n])


def test_write_then_read_round_trips_torch_and_numpy_tensors():
    tensors = {"a/x": torch.arange(6, dtype=torch.float32).view(2, 3), "b": np.array([1, 2, 255], np.uint8)}
    document = {"format": "demo", "loss": float("nan")}
    data = container.write(document, tensors, key="demo", allow_nan=True)
    header = _header(data)
    assert set(header["__metadata__"]) == {"demo"}
    stored = json.loads(header["__metadata__"]["demo"])
    # the seal, recomputed independently: SHA-256 of each tensor's bytes and of the canonical document
    assert stored["digests"]["tensors"] == {
        "a/x": hashlib.sha256(np.arange(6, dtype="<f4").tobytes()).hexdigest(),
        "b": hashlib.sha256(bytes([1, 2, 255])).hexdigest(),
    }
    body = '{"format":"demo","loss":NaN}'
    assert stored["digests"]["document"] == hashlib.sha256(body.encode()).hexdigest()
    parsed = container.read(data, key="demo", label="demo file", kind="demo container", allow_nan=True)
    assert parsed.document["format"] == "demo" and np.isnan(parsed.document["loss"])
    assert np.array_equal(parsed.tensors["a/x"], np.arange(6, dtype=np.float32).reshape(2, 3))
    assert parsed.tensors["b"].tolist() == [1, 2, 255]


def test_nan_is_refused_unless_allowed():
    with pytest.raises(ValueError):
        container.write({"loss": float("nan")}, {}, key="demo")
    data = container.write({"loss": float("nan")}, {}, key="demo", allow_nan=True)
    with pytest.raises(MaskforgeError) as caught:
        container.read(data, key="demo", label="x", kind="demo container")
    assert str(caught.value) == "x: the demo metadata contains NaN, which is not valid JSON"


def test_a_changed_document_or_tensor_breaks_the_seal():
    data = container.write({"v": 1}, {"t": np.zeros(4, np.uint8)}, key="demo")
    edited = data.replace(b'\\"v\\":1', b'\\"v\\":2')
    with pytest.raises(MaskforgeError) as caught:
        container.read(edited, key="demo", label="x", kind="demo container")
    assert str(caught.value) == "x: metadata digest mismatch (the JSON document was modified or corrupted)"
    flipped = data[:-1] + b"\x01"
    with pytest.raises(MaskforgeError) as caught:
        container.read(flipped, key="demo", label="x", kind="demo container")
    assert str(caught.value) == "x: tensor t does not match its digest (corrupted)"


def test_write_file_is_the_same_bytes_as_write(tmp_path):
    tensors = {"w": torch.ones(3, 2), "m": np.array([7], np.uint8)}
    sealed = container.write_file(tmp_path / "c.safetensors", {"k": 0.5}, tensors, key="demo")
    assert (tmp_path / "c.safetensors").read_bytes() == container.write({"k": 0.5}, tensors, key="demo")
    assert sealed["digests"]["document"] == container.document_digest({"k": 0.5})

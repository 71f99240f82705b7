"""Tests for maskforge.artifact: round trips, byte determinism, the bit packing against an independent
packer, the size bound, and every validation error on files the tests forge or corrupt themselves."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from safetensors.numpy import save as st_save

from helpers import perturb_like_search
from maskforge import regen
from maskforge.archs import arch_args, create_model
from maskforge.artifact import (
    FORMAT_VERSION,
    Artifact,
    artifact_bytes,
    artifact_from_bytes,
    build_artifact,
    inspect_artifact,
    load_artifact,
    pack_mask,
    save_artifact,
    unpack_mask,
)
from maskforge.data import InputSpec
from maskforge.errors import MaskforgeError
from maskforge.layers import batchnorm_modules, kept_count, masked_modules


# ---------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------


def _spec(channels: int, size: tuple[int, int], classes: int) -> InputSpec:
    return InputSpec(
        channels, size[0], size[1], (0.5,) * channels, (0.25,) * channels, tuple(f"class{i}" for i in range(classes))
    )


def _searched(
    arch: str,
    channels: int,
    size: tuple[int, int],
    classes: int,
    *,
    k: float = 0.5,
    seed: int = 0,
    init: str = "signed_constant",
    scale_fan: bool = False,
):
    """A model that looks searched: scores moved away from their initial values, BN statistics set."""
    model = create_model(
        arch, in_channels=channels, num_classes=classes, image_size=size, k=k, seed=seed, init=init, scale_fan=scale_fan
    )
    perturb_like_search(model, seed + 100, score_noise=0.1, bn_mean_scale=1.0, bn_var_floor=0.1)
    model.eval()
    artifact = build_artifact(
        model,
        arch=arch,
        arch_args=arch_args(channels, classes, size),
        spec=_spec(channels, size, classes),
        seed=seed,
        init=init,
        scale_fan=scale_fan,
        k=k,
        provenance={"data": "test", "epochs": 0},
    )
    return model, artifact


def _split(data: bytes) -> tuple[dict, bytes]:
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def _join(header: dict, body: bytes) -> bytes:
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw + body


def _canonical(value) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def _resign(document: dict) -> None:
    """Recompute digests.document as docs/FORMAT.md 2.3 specifies (independently of the library)."""
    body = {key: value for key, value in document.items() if key != "digests"}
    document["digests"]["document"] = hashlib.sha256(_canonical(body).encode("utf-8")).hexdigest()


def _edit_document(data: bytes, edit, *, resign: bool) -> bytes:
    header, body = _split(data)
    document = json.loads(header["__metadata__"]["maskforge"])
    edit(document)
    if resign:
        _resign(document)
    header["__metadata__"]["maskforge"] = _canonical(document)
    return _join(header, body)


def _pack_reference(bits: np.ndarray) -> bytes:
    """Bit j of byte b is weight 8b + j (docs/FORMAT.md 2.1), written out by hand."""
    out = bytearray((bits.size + 7) // 8)
    for i, bit in enumerate(bits.tolist()):
        if bit:
            out[i // 8] |= 1 << (i % 8)
    return bytes(out)


@pytest.fixture(scope="module")
def resnet(tmp_path_factory):
    model, artifact = _searched("resnet18", 3, (16, 16), 3, k=0.3, seed=5, init="kaiming_normal", scale_fan=True)
    path = save_artifact(artifact, tmp_path_factory.mktemp("resnet") / "artifact.safetensors")
    return model, artifact, path


@pytest.fixture(scope="module")
def conv(tmp_path_factory):
    model, artifact = _searched("conv2", 1, (12, 12), 4, k=0.5, seed=3)
    path = save_artifact(artifact, tmp_path_factory.mktemp("conv") / "artifact.safetensors")
    return model, artifact, path


# ---------------------------------------------------------------------------------------------------------
# Bit packing
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 7, 8, 9, 63, 64, 65, 1000])
def test_pack_mask_bit_order_against_reference(n):
    gen = torch.Generator().manual_seed(n)
    mask = torch.rand(n, generator=gen) < 0.4
    packed = pack_mask(mask)
    assert packed.dtype == np.uint8 and packed.shape == ((n + 7) // 8,)
    assert packed.tobytes() == _pack_reference(mask.numpy())
    assert torch.equal(unpack_mask(packed, (n,)), mask)


def test_pack_mask_uses_c_order_of_the_weight_shape():
    mask = torch.zeros(2, 3, 2, 2, dtype=torch.bool)
    mask[0, 0, 0, 1] = True  # flat 1  -> byte 0 bit 1
    mask[0, 2, 1, 1] = True  # flat 11 -> byte 1 bit 3
    mask[1, 2, 1, 1] = True  # flat 23 -> byte 2 bit 7
    assert pack_mask(mask).tolist() == [0b10, 0b1000, 0b10000000]
    assert pack_mask(mask.transpose(0, 1).contiguous().transpose(0, 1)).tolist() == [0b10, 0b1000, 0b10000000]
    assert torch.equal(unpack_mask(pack_mask(mask), (2, 3, 2, 2)), mask)


def test_unpack_mask_rejects_bad_input():
    with pytest.raises(MaskforgeError, match=r"^packed mask has non-zero padding bits$"):
        unpack_mask(np.array([0b1000_0000], dtype=np.uint8), (7,))
    with pytest.raises(
        MaskforgeError,
        match=r"^packed mask has shape \(2,\) and dtype uint8, expected uint8 of 1 "
        r"bytes for weights of shape \[7\]$",
    ):
        unpack_mask(np.zeros(2, dtype=np.uint8), (7,))
    with pytest.raises(MaskforgeError, match=r"^packed mask has shape \(1,\) and dtype int8, expected uint8"):
        unpack_mask(np.zeros(1, dtype=np.int8), (7,))


# ---------------------------------------------------------------------------------------------------------
# Round trip and determinism
# ---------------------------------------------------------------------------------------------------------


def test_round_trip(resnet):
    model, artifact, path = resnet
    loaded = load_artifact(path)
    assert loaded.document == artifact.document
    assert loaded.path == path and loaded.file_bytes == path.stat().st_size
    layers = masked_modules(model)
    assert set(loaded.masks) == {f"{name}.weight" for name in layers}
    for name, layer in layers.items():
        mask = loaded.masks[f"{name}.weight"]
        assert mask.dtype == torch.bool and mask.shape == layer.weight.shape
        oracle = torch.zeros(layer.weight.numel(), dtype=torch.bool)
        scores = layer.scores.detach().abs().reshape(-1).tolist()
        order = sorted(range(layer.weight.numel()), key=lambda i, s=scores: (-s[i], i))
        oracle[order[: kept_count(layer.weight.numel(), 0.3)]] = True
        assert torch.equal(mask.reshape(-1), oracle), name
        if layer.weight.numel() > 50_000:
            break  # the pure-Python sort oracle on the first (small and medium) layers is enough
    for name, bn in batchnorm_modules(model).items():
        assert torch.equal(loaded.bn_stats[f"{name}.running_mean"], bn.running_mean)
        assert torch.equal(loaded.bn_stats[f"{name}.running_var"], bn.running_var)
    assert (loaded.arch, loaded.k, loaded.seed, loaded.init, loaded.scale_fan) == (
        "resnet18",
        0.3,
        5,
        "kaiming_normal",
        True,
    )
    assert loaded.arch_args == {"in_channels": 3, "num_classes": 3, "image_size": [16, 16]}
    assert loaded.spec == _spec(3, (16, 16), 3)
    assert loaded.masked_weights == sum(layer.weight.numel() for layer in layers.values())
    assert loaded.kept_weights == sum(kept_count(layer.weight.numel(), 0.3) for layer in layers.values())
    assert loaded.digest == loaded.document["digests"]["document"]


def test_document_contents(resnet):
    model, artifact, path = resnet
    doc = load_artifact(path).document
    assert doc["format"] == "maskforge-artifact" and doc["format_version"] == 1
    assert doc["generator"] == {"id": "maskforge-splitmix64", "version": 1}
    assert doc["init"] == {"distribution": "kaiming_normal", "scale_fan": True}
    assert doc["provenance"] == {"data": "test", "epochs": 0}
    assert doc["bn"] == sorted(batchnorm_modules(model))
    for name, layer in masked_modules(model).items():
        info = doc["layers"][f"{name}.weight"]
        n = layer.weight.numel()
        assert info["shape"] == list(layer.weight.shape)
        assert info["kept"] == kept_count(n, 0.3) and math.isclose(info["density"], info["kept"] / n)
        assert info["fan_in"] == math.prod(layer.weight.shape[1:])
        # the recorded weight digest is that of the independently regenerated tensor
        expected = hashlib.sha256(
            regen.generate(5, f"{name}.weight", tuple(layer.weight.shape), "kaiming_normal", k=0.3, scale_fan=True)
            .astype("<f4")
            .tobytes()
        ).hexdigest()
        assert doc["digests"]["weights"][f"{name}.weight"] == expected
    # stored-tensor digests are SHA-256 of the raw stored bytes
    header, body = _split(path.read_bytes())
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        start, end = entry["data_offsets"]
        assert doc["digests"]["tensors"][name] == hashlib.sha256(body[start:end]).hexdigest()
    assert set(doc["digests"]["tensors"]) == set(header) - {"__metadata__"}
    # the document digest covers everything but itself
    body_doc = {key: value for key, value in doc.items() if key != "digests"}
    assert doc["digests"]["document"] == hashlib.sha256(_canonical(body_doc).encode()).hexdigest()
    # metadata is one canonical JSON string
    assert set(header["__metadata__"]) == {"maskforge"}
    assert header["__metadata__"]["maskforge"] == _canonical(doc)


def test_same_artifact_same_bytes(conv, tmp_path):
    model, artifact, path = conv
    again = save_artifact(artifact, tmp_path / "again.safetensors")
    assert again.read_bytes() == path.read_bytes()
    rebuilt = build_artifact(
        model,
        arch="conv2",
        arch_args=arch_args(1, 4, (12, 12)),
        spec=_spec(1, (12, 12), 4),
        seed=3,
        init="signed_constant",
        scale_fan=False,
        k=0.5,
        provenance={"data": "test", "epochs": 0},
    )
    assert artifact_bytes(rebuilt) == path.read_bytes()
    # saving a loaded artifact reproduces the file too
    assert artifact_bytes(load_artifact(path)) == path.read_bytes()


def test_create_model_reproduces_the_searched_model(resnet, conv):
    for model, _, path in (resnet, conv):
        loaded = load_artifact(path)
        rebuilt = loaded.create_model()
        assert not rebuilt.training
        for (name, a), b in zip(masked_modules(model).items(), masked_modules(rebuilt).values()):
            assert torch.equal(a.weight, b.weight), name
            assert torch.equal(a.mask(), b.mask()), name
        shape = (3, loaded.spec.channels, loaded.spec.height, loaded.spec.width)
        x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            assert torch.equal(model.eval()(x), rebuilt(x))


def test_inspect_summary(conv):
    model, artifact, path = conv
    summary = inspect_artifact(path)
    masked = sum(layer.weight.numel() for layer in masked_modules(model).values())
    assert summary["file_bytes"] == path.stat().st_size
    assert summary["masked_weights"] == masked
    assert summary["kept_weights"] == sum(
        kept_count(layer.weight.numel(), 0.5) for layer in masked_modules(model).values()
    )
    assert math.isclose(summary["bits_per_weight"], 8 * path.stat().st_size / masked)
    assert summary["arch"] == "conv2" and summary["k"] == 0.5 and summary["seed"] == 3
    json.dumps(summary)  # JSON-able


# ---------------------------------------------------------------------------------------------------------
# Size
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch,channels,size,classes", [("fc", 1, (28, 28), 10), ("conv4", 3, (32, 32), 10)])
def test_size_bound_small(arch, channels, size, classes, tmp_path):
    model, artifact = _searched(arch, channels, size, classes)
    path = save_artifact(artifact, tmp_path / "a.safetensors")
    _check_size(model, path)


def test_size_bound_resnet18(resnet):
    model, _, path = resnet
    _check_size(model, path)


def _check_size(model, path: Path) -> None:
    masked = sum(layer.weight.numel() for layer in masked_modules(model).values())
    bn_values = sum(2 * bn.num_features for bn in batchnorm_modules(model).values())
    size = path.stat().st_size
    assert size <= masked / 8 + 4 * bn_values + 64 * 1024, (size, masked)
    assert size >= masked / 8  # and the masks really are in there


@pytest.mark.slow
def test_wrn50_imagenet_artifact_is_under_9_mib(tmp_path):
    model, artifact = _searched("wrn50", 3, (224, 224), 1000)
    path = save_artifact(artifact, tmp_path / "wrn50.safetensors")
    masked = sum(layer.weight.numel() for layer in masked_modules(model).values())
    with torch.device("meta"):
        reference = torchvision.models.wide_resnet50_2(num_classes=1000)
    assert masked == sum(
        m.weight.numel() for m in reference.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))
    )
    assert path.stat().st_size <= 9 * 2**20
    _check_size(model, path)


# ---------------------------------------------------------------------------------------------------------
# Validation errors
# ---------------------------------------------------------------------------------------------------------


def _write(tmp_path: Path, data: bytes, name: str = "bad.safetensors") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def _refused(tmp_path: Path, data: bytes, message: str, name: str = "bad.safetensors") -> None:
    """Loading `data` fails with exactly `message` ({path} stands for the file's path)."""
    path = _write(tmp_path, data, name)
    with pytest.raises(MaskforgeError) as caught:
        load_artifact(path)
    assert str(caught.value) == message.format(path=path)


def _forged(conv, edit_masks, edit_document) -> bytes:
    """The conv artifact with its masks and document edited and every digest re-signed (written from the
    spec here, not by maskforge), as a tool that knows the format would forge it."""
    header, _ = _split(conv[2].read_bytes())
    document = json.loads(header["__metadata__"]["maskforge"])
    masks = dict(load_artifact(conv[2]).masks)
    edit_masks(masks)
    edit_document(document)
    tensors = {f"mask/{p}": pack_mask(m) for p, m in masks.items()}
    document["digests"]["tensors"] = {n: hashlib.sha256(a.tobytes()).hexdigest() for n, a in tensors.items()}
    _resign(document)
    return st_save(tensors, metadata={"maskforge": _canonical(document)})


def test_missing_and_folder_paths(tmp_path):
    with pytest.raises(MaskforgeError) as caught:
        load_artifact(tmp_path / "nope.safetensors")
    assert str(caught.value) == f"artifact {tmp_path / 'nope.safetensors'} does not exist"
    with pytest.raises(MaskforgeError) as caught:
        load_artifact(tmp_path)
    assert str(caught.value) == f"{tmp_path} is a folder, not an artifact file"


@pytest.mark.parametrize(
    "data,reason",
    [
        (b"", "only 0 bytes"),
        (b"hello", "only 5 bytes"),
        (b"\x00" * 100, "not a safetensors file, or truncated"),
        (b"PK\x03\x04" + bytes(200), "not a safetensors file, or truncated"),
        ((10).to_bytes(8, "little") + b"not json!!", "not a safetensors file, or truncated"),
        ((9).to_bytes(8, "little") + b"{not json", "the safetensors header is not valid JSON (JSONDecodeError)"),
        ((2**40).to_bytes(8, "little"), "not a safetensors file, or truncated"),
    ],
)
def test_not_a_safetensors_file(tmp_path, data, reason):
    _refused(tmp_path, data, f"{{path}} is not a maskforge artifact ({reason})")


def test_safetensors_without_maskforge_metadata(tmp_path):
    message = "{path} is a safetensors file but not a maskforge artifact (no 'maskforge' metadata)"
    _refused(tmp_path, st_save({"weight": np.zeros((2, 2), dtype=np.float32)}, metadata={"format": "pt"}), message)
    _refused(tmp_path, st_save({"weight": np.zeros((2, 2), dtype=np.float32)}), message, "plain.safetensors")


def test_newer_format_version_says_upgrade(conv, tmp_path):
    data = conv[2].read_bytes()
    _refused(
        tmp_path,
        _edit_document(data, lambda doc: doc.update(format_version=FORMAT_VERSION + 1), resign=True),
        "{path} uses artifact format version 2, newer than this maskforge reads (1); upgrade maskforge",
    )
    _refused(
        tmp_path,
        _edit_document(data, lambda doc: doc.update(format_version=0), resign=True),
        "{path}: unsupported format version 0",
        "old.safetensors",
    )


def test_resigned_unchanged_document_still_loads(conv, tmp_path):
    # The helper itself is faithful: re-serialising and re-signing an unchanged document gives a valid file.
    data = _edit_document(conv[2].read_bytes(), lambda doc: None, resign=True)
    loaded = load_artifact(_write(tmp_path, data))
    assert loaded.document == load_artifact(conv[2]).document


def test_flipped_mask_bit_is_caught_by_the_tensor_digest(conv, tmp_path):
    data = conv[2].read_bytes()
    header, body = _split(data)
    start, end = header["mask/features.2.weight"]["data_offsets"]
    corrupted = bytearray(data)
    corrupted[8 + (len(data) - 8 - len(body)) + (start + end) // 2] ^= 0b0001_0000
    _refused(tmp_path, bytes(corrupted), "{path}: tensor mask/features.2.weight does not match its digest (corrupted)")


@pytest.mark.parametrize(
    "field,value", [("k", 0.25), ("seed", 4), ("arch", "conv4"), ("init", "kaiming_normal"), ("heldout", 0.99)]
)
def test_edited_document_is_caught_by_the_document_digest(conv, tmp_path, field, value):
    def edit(doc):
        if field == "arch":
            doc["arch"]["name"] = value
        elif field == "init":
            doc["init"]["distribution"] = value
        elif field == "heldout":
            doc["provenance"]["heldout_acc"] = value
        else:
            doc[field] = value

    _refused(
        tmp_path,
        _edit_document(conv[2].read_bytes(), edit, resign=False),
        "{path}: metadata digest mismatch (the JSON document was modified or corrupted)",
    )


def test_edited_tensor_digest_list_is_caught(conv, tmp_path):
    def edit(doc):
        doc["digests"]["tensors"]["mask/features.0.weight"] = "0" * 64

    # digests.tensors is outside the document digest, but must still match the stored tensors
    _refused(
        tmp_path,
        _edit_document(conv[2].read_bytes(), edit, resign=True),
        "{path}: tensor mask/features.0.weight does not match its digest (corrupted)",
    )


def test_missing_layer_is_refused(conv, tmp_path):
    victim = "features.2.weight"

    def drop(document):
        del document["layers"][victim]
        del document["digests"]["weights"][victim]

    _refused(
        tmp_path,
        _forged(conv, lambda masks: masks.pop(victim), drop),
        "{path}: layers do not match architecture conv2 (missing ['features.2.weight'], unexpected [])",
    )


def test_wrong_kept_count_is_refused(conv, tmp_path):
    # A forged file whose mask keeps one weight too many (all digests re-signed) is still refused.
    def one_more(masks):
        flat = masks["features.0.weight"].clone().reshape(-1)
        flat[int((~flat).nonzero()[0])] = True
        masks["features.0.weight"] = flat.view_as(masks["features.0.weight"])

    _refused(
        tmp_path,
        _forged(conv, one_more, lambda document: None),
        "{path}: layer features.0.weight keeps 289 weights but the metadata says 288",
    )


@pytest.mark.parametrize(
    "edit,message",
    [
        (
            lambda d: d["layers"]["features.0.weight"].update(shape=[64, 1, 5, 5]),
            "{path}: layers.features.0.weight density 0.5 is not kept/weights = 0.18",
        ),
        (lambda d: d.update(k=1.5), "{path}: k must be <= 1, got 1.5"),
        (lambda d: d.update(seed=-1), "{path}: seed must be >= 0, got -1"),
        (lambda d: d["arch"].update(name="lenet9"), "{path}: unknown architecture 'lenet9' (known: fc, conv2, conv4,"),
        (
            lambda d: d["init"].update(distribution="xavier"),
            "{path}: init.distribution must be one of "
            "'signed_constant', 'unsigned_constant' or 'kaiming_normal', "
            "got 'xavier'",
        ),
        (
            lambda d: d.update(generator={"id": "maskforge-splitmix64", "version": 2}),
            "{path}: generator.version must be <= 1, got 2",
        ),
        (lambda d: d.pop("layers"), "{path}: field layers is missing"),
        (
            lambda d: d["input"].update(channels=3, mean=[0.5] * 3, std=[0.25] * 3),
            "{path}: input (3 channel(s), 12x12, 4 class names) does not match arch.args (1 channel(s), 12x12, 4 classes)",
        ),
        (lambda d: d["input"].update(extra=1), "{path}: unknown field input.extra"),
        (lambda d: d["arch"]["args"].update(depth=3), "{path}: unknown field arch.args.depth"),
        (lambda d: d["arch"]["args"].update(width=0), "{path}: arch.args.width must be > 0, got 0"),
        (lambda d: d.update(topk="best"), "{path}: topk must be one of 'layer' or 'global', got 'best'"),
        (
            lambda d: d["digests"]["weights"].update({"features.0.weight": "AB" * 32}),
            "{path}: digests.weights.features.0.weight must be 64 lowercase hex digits (a SHA-256), got '"
            + "AB" * 32
            + "'",
        ),
    ],
)
def test_schema_errors_name_the_field(conv, tmp_path, edit, message):
    data = _edit_document(conv[2].read_bytes(), edit, resign=True)
    path = _write(tmp_path, data)
    with pytest.raises(MaskforgeError) as caught:
        load_artifact(path)
    assert str(caught.value).startswith(message.format(path=path)), str(caught.value)


def test_global_topk_lets_each_layer_keep_its_own_count(conv, tmp_path):
    """With topk "global" the kept-count rule does not apply (each layer keeps 1..n); the per-layer rule
    still binds a document without topk."""

    def shift(masks):  # one weight moves from features.0 to features.2
        for name, value in (("features.0.weight", False), ("features.2.weight", True)):
            flat = masks[name].clone().reshape(-1)
            flat[int((flat != value).nonzero()[0])] = value
            masks[name] = flat.view_as(masks[name])

    def counts(document, topk):
        for name, delta in (("features.0.weight", -1), ("features.2.weight", 1)):
            layer = document["layers"][name]
            layer["kept"] += delta
            layer["density"] = layer["kept"] / math.prod(layer["shape"])
        if topk:
            document["topk"] = topk

    loaded = load_artifact(_write(tmp_path, _forged(conv, shift, lambda d: counts(d, "global"))))
    assert loaded.topk == "global" and loaded.meta.layers["features.0.weight"].kept == 287
    _refused(
        tmp_path,
        _forged(conv, shift, lambda d: counts(d, None)),
        "{path}: layer features.0.weight: kept count 287 does not match k=0.5",
        "layer.safetensors",
    )


def test_truncated_file_is_refused(conv, tmp_path):
    data = conv[2].read_bytes()
    header_end = 8 + int.from_bytes(data[:8], "little")
    for cut, reason in (
        (len(data) - 1, "is truncated, or trailing data (safetensors: incomplete metadata, file not fully covered)"),
        (len(data) // 2, "is truncated, or trailing data (safetensors: incomplete metadata, file not fully covered)"),
        (header_end - 1, "is not a maskforge artifact (not a safetensors file, or truncated)"),
        (20, "is not a maskforge artifact (not a safetensors file, or truncated)"),
    ):
        _refused(tmp_path, data[:cut], "{path} " + reason, f"cut{cut}.safetensors")


def test_non_finite_bn_statistics_are_refused(resnet, tmp_path):
    loaded = load_artifact(resnet[2])
    stats = dict(loaded.bn_stats)
    stats["bn1.running_var"] = stats["bn1.running_var"].clone()
    stats["bn1.running_var"][0] = float("nan")
    forged = Artifact(dict(loaded.document), loaded.masks, stats)
    _refused(tmp_path, artifact_bytes(forged), "{path}: bn/bn1.running_var has non-finite values")


# ---------------------------------------------------------------------------------------------------------
# Numbers are numbers, whatever their JSON spelling (found from outside: bug 2)
# ---------------------------------------------------------------------------------------------------------


def _respell(value, as_float: bool):
    """Every number in `value` spelled as a JSON float (3 -> 3.0) or, where integral, as an integer."""
    if isinstance(value, dict):
        return {key: _respell(item, as_float) for key, item in value.items()}
    if isinstance(value, list):
        return [_respell(item, as_float) for item in value]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return value
    if as_float:
        return float(value)
    return int(value) if float(value).is_integer() else value


@pytest.mark.parametrize("as_float", [False, True], ids=["integers as 1", "integers as 1.0"])
def test_numbers_are_read_as_numbers_whatever_their_json_spelling(tmp_path, as_float):
    """A JavaScript or Go writer spells k = 1 as `1`; another writer may spell every number `3.0`."""
    model, artifact = _searched("conv2", 1, (12, 12), 4, k=1.0, seed=3)
    original = artifact_bytes(artifact)
    header, _ = _split(original)
    document = json.loads(header["__metadata__"]["maskforge"])
    assert document["k"] == 1.0 and isinstance(document["k"], float)

    def respell(doc):
        for key in [key for key in doc if key != "digests"]:
            doc[key] = _respell(doc[key], as_float)

    data = _edit_document(original, respell, resign=True)
    edited = json.loads(_split(data)[0]["__metadata__"]["maskforge"])
    assert (type(edited["k"]), type(edited["seed"])) == ((float, float) if as_float else (int, int))
    path = tmp_path / "respelled.safetensors"
    path.write_bytes(data)
    loaded = load_artifact(path)
    assert (loaded.k, loaded.seed, loaded.arch_args["image_size"]) == (1.0, 3, [12, 12])
    assert type(loaded.k) is float and type(loaded.seed) is int
    assert all(type(side) is int for side in loaded.arch_args["image_size"])
    assert artifact_bytes(loaded) == data  # re-saving keeps the document as written (its digest stays valid)
    x = torch.randn(2, 1, 12, 12, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded.create_model()(x), model.eval()(x))


# ---------------------------------------------------------------------------------------------------------
# The safetensors layout is checked by the safetensors library itself (maskforge no longer repeats it)
# ---------------------------------------------------------------------------------------------------------


def _first_and_last_tensor(header: dict) -> tuple[str, str]:
    names = sorted((name for name in header if name != "__metadata__"), key=lambda n: header[n]["data_offsets"])
    return names[0], names[-1]


def _shift(header: dict, name: str, delta: int) -> dict:
    header = json.loads(json.dumps(header))
    start, end = header[name]["data_offsets"]
    header[name]["data_offsets"] = [start + delta, end + delta]
    return header


def _forge(data: bytes, how: str) -> bytes:
    header, body = _split(data)
    first, last = _first_and_last_tensor(header)
    if how == "gap":
        return _join(_shift(header, last, 1), body + b"\x00")
    if how == "overlap":
        return _join(_shift(header, last, -1), body[:-1])
    if how == "trailing data":
        return _join(header, body + b"\x00" * 4)
    if how == "truncated":
        return _join(header, body[:-4])
    if how == "size mismatch":
        edited = json.loads(json.dumps(header))
        edited[last]["shape"] = [edited[last]["shape"][0] + 1]
        return _join(edited, body)
    if how == "unknown dtype":
        edited = json.loads(json.dumps(header))
        edited[first]["dtype"] = "Q7"
        return _join(edited, body)
    raise AssertionError(how)


@pytest.mark.parametrize(
    "how,message",
    [
        ("gap", "forged is damaged (safetensors: invalid offset for tensor "),
        ("overlap", "forged is damaged (safetensors: invalid offset for tensor "),
        ("trailing data", "forged is truncated, or trailing data (safetensors: incomplete metadata, file not fully"),
        ("truncated", "forged is truncated, or trailing data (safetensors: incomplete metadata, file not fully"),
        ("size mismatch", "forged is damaged (safetensors: invalid shape, data type, or offset for tensor)"),
        ("unknown dtype", "forged is damaged (safetensors: invalid JSON in header: unknown variant `Q7`"),
    ],
)
def test_layout_damage_is_refused_by_safetensors_itself(conv, how, message):
    from safetensors import SafetensorError
    from safetensors.numpy import load as safetensors_load

    data = _forge(conv[2].read_bytes(), how)
    with pytest.raises(SafetensorError):  # the library alone refuses it: maskforge need not check it again
        safetensors_load(data)
    with pytest.raises(MaskforgeError) as caught:
        artifact_from_bytes(data, "forged")
    assert str(caught.value).startswith(message), str(caught.value)

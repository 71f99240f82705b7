"""Fuzz the artifact loader: every mutation of a real artifact is rejected with a clear `MaskforgeError`,
or gives a network whose outputs are bit-identical to the original's. Zero silent differences.

Two artifacts are mutated:

* `fc`: a real artifact from a 2-step search on the built-in demo data (three masked linear layers);
* `tiny_bn`: a small conv net with batch norm, registered for this test only, so that the batch-norm
  tensors (float32 data the loader must also protect) are fuzzed too.

Mutation classes (seeded RNG, so a failure is reproducible from its index): single-bit flips anywhere
in the file and inside the header, random byte overwrites, truncations at random offsets, appended
bytes, structural edits of the safetensors header JSON (dtype, shape, offsets, swapped or renamed or
deleted or duplicated entries, extra keys), swapped tensor data, and edits of the maskforge document
(seed, k, arch, init, generator, format version, layer shapes and counts, batch-norm list, provenance,
digests, unknown keys) both *naive* (the document digest is left as it was) and *consistent* (the
document digest is recomputed, as a tool that knows the format would do). Benign rewrites (reordered
header entries, whitespace, non-canonical JSON, provenance notes with a recomputed digest) must load
and give identical outputs.

A consistent edit of the fields that only the document digest protects (class names, mean/std,
provenance) gives a legitimately *different* artifact: digests detect corruption, not forgery, so those
edits are only made naively here (see docs/TROUBLESHOOTING.md, "authenticity").
"""

from __future__ import annotations

import copy
import hashlib
import json
import random
from collections import Counter
from dataclasses import dataclass

import numpy as np
import pytest
import torch
import torch.nn as nn

from maskforge import archs
from maskforge.artifact import artifact_from_bytes, build_artifact, save_artifact
from maskforge.container import canonical_json
from maskforge.data import InputSpec
from maskforge.errors import MaskforgeError
from maskforge.layers import MaskedConv2d, MaskedLinear, NonAffineBatchNorm2d, batchnorm_modules, masked_modules
from maskforge.materialization import materialize
from maskforge.searches import SearchConfig, search

SEED = 20240229
TINY_ARCH = "fuzz_tiny_bn"


# ---------------------------------------------------------------------------------------------------------
# the two artifacts
# ---------------------------------------------------------------------------------------------------------


def _tiny_bn(in_channels: int, num_classes: int, image_size, k: float = 0.5) -> nn.Module:
    return nn.Sequential(
        MaskedConv2d(in_channels, 4, 3, padding=1, k=k),
        NonAffineBatchNorm2d(4),
        nn.ReLU(),
        MaskedConv2d(4, 6, 3, padding=1, k=k),
        NonAffineBatchNorm2d(6),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        MaskedLinear(24, num_classes, k=k),
    )


@pytest.fixture(scope="module")
def tiny_arch():
    archs.register_arch(TINY_ARCH, "test-only conv net with batch norm")(_tiny_bn)
    yield TINY_ARCH
    archs.ARCHS.pop(TINY_ARCH, None)


@pytest.fixture(scope="module")
def fc_artifact(tmp_path_factory) -> bytes:
    out = tmp_path_factory.mktemp("fuzz_fc")
    result = search(
        SearchConfig(arch="fc", k=0.5, epochs=1, max_steps=2, batch_size=64, device="cpu", workers=0, out=str(out))
    )
    return result.artifact_path.read_bytes()


@pytest.fixture(scope="module")
def bn_artifact(tiny_arch, tmp_path_factory) -> bytes:
    spec = InputSpec(2, 6, 6, (0.4, 0.5), (0.2, 0.3), tuple(f"class{i}" for i in range(5)))
    args = archs.arch_args(2, 5, (6, 6))
    model = archs.create_model(tiny_arch, **args, k=0.3, seed=7, init="kaiming_normal", scale_fan=True)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for layer in masked_modules(model).values():  # a mask that is not just the initial scores' top-k
            layer.scores.copy_(torch.randn(layer.scores.shape, generator=generator))
        for bn in batchnorm_modules(model).values():
            bn.running_mean.copy_(torch.randn(bn.num_features, generator=generator))
            bn.running_var.copy_(torch.rand(bn.num_features, generator=generator) + 0.5)
    artifact = build_artifact(
        model,
        arch=tiny_arch,
        arch_args=args,
        spec=spec,
        seed=7,
        init="kaiming_normal",
        scale_fan=True,
        k=0.3,
        provenance={"data": "synthetic", "heldout_acc": None},
    )
    path = save_artifact(artifact, tmp_path_factory.mktemp("fuzz_bn") / "artifact.safetensors")
    return path.read_bytes()


# ---------------------------------------------------------------------------------------------------------
# file surgery helpers (an independent reading of the safetensors layout, not maskforge's code)
# ---------------------------------------------------------------------------------------------------------


@dataclass
class Parsed:
    header: dict  # the safetensors header, including __metadata__
    body: bytes  # the tensor data after the header
    document: dict  # the maskforge JSON document

    @classmethod
    def of(cls, data: bytes) -> "Parsed":
        n = int.from_bytes(data[:8], "little")
        header = json.loads(data[8 : 8 + n])
        return cls(header, data[8 + n :], json.loads(header["__metadata__"]["maskforge"]))

    def region(self, name: str) -> tuple[int, int]:
        return tuple(self.header[name]["data_offsets"])

    def tensor_names(self) -> list[str]:
        return sorted(k for k in self.header if k != "__metadata__")


def _assemble(header_json: bytes, body: bytes) -> bytes:
    header_json += b" " * (-len(header_json) % 8)
    return len(header_json).to_bytes(8, "little") + header_json + body


def _with_header(parsed: Parsed, header: dict, body: bytes | None = None, **dumps) -> bytes:
    return _assemble(json.dumps(header, **dumps).encode(), parsed.body if body is None else body)


def _doc_digest(document: dict) -> str:
    # docs/FORMAT.md 2.3: SHA-256 of the canonical JSON of the document without `digests`
    body = {key: value for key, value in document.items() if key != "digests"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()


def _with_document(parsed: Parsed, document: dict, *, redigest: bool, text: str | None = None) -> bytes:
    document = copy.deepcopy(document)
    if redigest and isinstance(document.get("digests"), dict):
        document["digests"]["document"] = _doc_digest(document)
    header = copy.deepcopy(parsed.header)
    header["__metadata__"]["maskforge"] = text if text is not None else canonical_json(document)
    return _with_header(parsed, header, separators=(",", ":"))


# ---------------------------------------------------------------------------------------------------------
# mutations
# ---------------------------------------------------------------------------------------------------------


def _flip(data: bytes, rng: random.Random, lo: int, hi: int) -> bytes:
    out = bytearray(data)
    out[rng.randrange(lo, hi)] ^= 1 << rng.randrange(8)
    return bytes(out)


def _header_edit(data: bytes, rng: random.Random) -> tuple[str, bytes]:
    p = Parsed.of(data)
    h = copy.deepcopy(p.header)
    names = p.tensor_names()
    name = rng.choice(names)
    choice = rng.randrange(14)
    if choice == 0:
        h[name]["dtype"] = rng.choice(["I8", "F32" if h[name]["dtype"] == "U8" else "U8", "BF16", "F64", "BOOL"])
        return "header.dtype", _with_header(p, h)
    if choice == 1:
        h[name]["shape"] = [h[name]["shape"][0] + rng.choice([-1, 1])]
        return "header.shape", _with_header(p, h)
    if choice == 2:
        delta = rng.choice([-4, -1, 1, 4])
        h[name]["data_offsets"] = [max(0, o + delta) for o in h[name]["data_offsets"]]
        return "header.offsets", _with_header(p, h)
    if choice == 3 and len(names) > 1:
        a, b = rng.sample(names, 2)
        h[a]["data_offsets"], h[b]["data_offsets"] = h[b]["data_offsets"], h[a]["data_offsets"]
        h[a]["shape"], h[b]["shape"] = h[b]["shape"], h[a]["shape"]
        h[a]["dtype"], h[b]["dtype"] = h[b]["dtype"], h[a]["dtype"]
        return "header.swap_entries", _with_header(p, h)
    if choice == 4 and len(names) > 1:
        a, b = rng.sample(names, 2)
        h[a], h[b] = h[b], h[a]
        return "header.rename_swap", _with_header(p, h)
    if choice == 5:
        del h[name]
        return "header.delete_entry", _with_header(p, h)
    if choice == 6:
        h["extra/tensor"] = {"dtype": "U8", "shape": [1], "data_offsets": [len(p.body), len(p.body) + 1]}
        return "header.extra_tensor", _with_header(p, h, body=p.body + b"\x00")
    if choice == 7:
        h[name]["note"] = "x"
        return "header.unknown_field", _with_header(p, h)
    if choice == 8:
        h["__metadata__"]["other"] = "value"
        return "header.extra_metadata", _with_header(p, h)
    if choice == 9:
        del h["__metadata__"]
        return "header.no_metadata", _with_header(p, h)
    if choice == 10:
        # a duplicated key: JSON parsers disagree on which one wins, so it must be refused
        text = json.dumps(h)
        entry = json.dumps({name: h[name]})[1:-1]
        return "header.duplicate_key", _assemble(text[:-1].encode() + b", " + entry.encode() + b"}", p.body)
    if choice == 11:
        h["__metadata__"] = rng.choice([[], "maskforge", {"maskforge": {"format": "x"}}, None])
        return "header.bad_metadata_type", _with_header(p, h)
    if choice == 12:
        raw = json.dumps(h).encode()
        return "header.nested", _assemble(b'{"x":' + b"[" * 100_000 + b"]" * 100_000 + b"," + raw[1:], p.body)
    # benign: the same header with reordered entries and whitespace -> must load, identical network
    items = list(h.items())
    rng.shuffle(items)
    return "benign.header_reorder", _with_header(p, dict(items), indent=rng.choice([None, 1, 2]))


def _swap_data(data: bytes, rng: random.Random) -> tuple[str, bytes]:
    p = Parsed.of(data)
    body = bytearray(p.body)
    names = p.tensor_names()
    same_size = [(a, b) for a in names for b in names if a < b and np.diff(p.region(a)) == np.diff(p.region(b))]
    if same_size and rng.random() < 0.5:
        a, b = rng.choice(same_size)
        (a0, a1), (b0, b1) = p.region(a), p.region(b)
        body[a0:a1], body[b0:b1] = p.body[b0:b1], p.body[a0:a1]
        return "swap.tensors", data[: len(data) - len(p.body)] + bytes(body)
    # swap two chunks inside one tensor: for a mask this keeps the number of kept weights
    name = max(names, key=lambda n: np.diff(p.region(n))[0]) if rng.random() < 0.5 else rng.choice(names)
    lo, hi = p.region(name)
    width = rng.choice([1, 4])
    if hi - lo < 2 * width:
        width = 1
    i, j = sorted(rng.sample(range(lo, hi - width + 1, width), 2)) if (hi - lo) // width >= 2 else (lo, lo)
    body[i : i + width], body[j : j + width] = p.body[j : j + width], p.body[i : i + width]
    return "swap.chunks", data[: len(data) - len(p.body)] + bytes(body)


def _doc_edits(document: dict, rng: random.Random) -> list[tuple[str, dict, bool]]:
    """(name, edited document, may the digest be recomputed) for the semantic fields."""
    d = document
    layer = rng.choice(sorted(d["layers"]))
    other_arch = rng.choice([a for a in archs.ARCHS if a != d["arch"]["name"]])
    other_init = rng.choice(
        [i for i in ("signed_constant", "unsigned_constant", "kaiming_normal") if i != d["init"]["distribution"]]
    )
    edits = {
        "seed+1": ("seed", d["seed"] + 1),
        "seed+2^40": ("seed", d["seed"] + 2**40),
        "seed-neg": ("seed", -1),
        "seed-str": ("seed", str(d["seed"])),
        "seed-float": ("seed", float(d["seed"])),
        "seed-bool": ("seed", True),
        "seed-huge": ("seed", 2**64),
        "k-other": ("k", rng.choice([0.1, 0.25, 0.7, 1.0])),
        "k-zero": ("k", 0.0),
        "k-big": ("k", 1.5),
        "k-int": ("k", 1),
        "k-str": ("k", "0.5"),
        "k-neg": ("k", -0.5),
        "arch-other": ("arch.name", other_arch),
        "arch-unknown": ("arch.name", "resnet9000"),
        "args-classes": ("arch.args.num_classes", d["arch"]["args"]["num_classes"] + 1),
        "args-size": ("arch.args.image_size", [s + 4 for s in d["arch"]["args"]["image_size"]]),
        "args-channels": ("arch.args.in_channels", d["arch"]["args"]["in_channels"] + 1),
        "args-extra": ("arch.args.depth", 3),
        "init-other": ("init.distribution", other_init),
        "init-scale": ("init.scale_fan", not d["init"]["scale_fan"]),
        "init-unknown": ("init.distribution", "xavier"),
        "generator": ("generator.version", 2),
        "generator-id": ("generator.id", "pcg64"),
        "version-2": ("format_version", 2),
        "version-0": ("format_version", 0),
        "version-str": ("format_version", "1"),
        "format": ("format", "other"),
        "layer-shape": (
            f"layers.{layer}.shape",
            [d["layers"][layer]["shape"][0] + 1] + d["layers"][layer]["shape"][1:],
        ),
        "layer-kept": (f"layers.{layer}.kept", d["layers"][layer]["kept"] + rng.choice([-1, 1])),
        "layer-density": (f"layers.{layer}.density", d["layers"][layer]["density"] / 2),
        "layer-fan": (f"layers.{layer}.fan_in", d["layers"][layer]["fan_in"] + 1),
        "layer-extra": (f"layers.{layer}.bias", True),
        "layer-rename": ("layers", {(k + "x" if k == layer else k): v for k, v in d["layers"].items()}),
        "bn-list": ("bn", d["bn"][:-1] if d["bn"] else ["features.1"]),
        "prov-acc-str": ("provenance.heldout_acc", "high"),
        "prov-acc-big": ("provenance.heldout_acc", 7.0),
        "prov-nested": ("provenance.data", {"a": 1}),
        "digest-weight": (f"digests.weights.{layer}", "0" * 64),
        "digest-weight-upper": (f"digests.weights.{layer}", d["digests"]["weights"][layer].upper()),
        "digest-tensor": (f"digests.tensors.mask/{layer}", "f" * 64),
        "digest-missing": ("digests.weights", {k: v for k, v in d["digests"]["weights"].items() if k != layer}),
        "unknown-top": ("comment", "hello"),
        "delete-top": ("provenance", None),
    }
    # only the document digest protects these: edited naively (a consistent edit is a new artifact)
    naive_only = {
        "input-mean": ("input.mean", [m + 0.1 for m in d["input"]["mean"]]),
        "input-std": ("input.std", [s * 2 for s in d["input"]["std"]]),
        "input-classes": ("input.class_names", list(reversed(d["input"]["class_names"]))),
        "prov-data": ("provenance.data", "somewhere else"),
    }
    out = []
    for table, redigest_ok in ((edits, True), (naive_only, False)):
        for name, (field, value) in table.items():
            edited = copy.deepcopy(d)
            *parents, leaf = field.split(".") if not field.startswith(("layers.", "digests.")) else _split_keyed(field)
            node = edited
            for key in parents:
                node = node[key]
            if value is None:
                node.pop(leaf, None)
            else:
                node[leaf] = value
            out.append((name, edited, redigest_ok))
    return out


def _split_keyed(field: str) -> list[str]:
    # "layers.1.weight.kept" -> ["layers", "1.weight", "kept"]; "digests.weights.1.weight" -> [..., "1.weight"]
    head, rest = field.split(".", 1)
    if head == "layers":
        param, leaf = rest.rsplit(".", 1)
        return [head, param, leaf]
    return [head, *rest.split(".", 1)]


def _mutations(data: bytes, rng: random.Random, plan: dict[str, int]):
    """Yield (class, mutated bytes), `plan[class]` of each."""
    p = Parsed.of(data)
    header_end = len(data) - len(p.body)
    for _ in range(plan["flip_any"]):
        yield "flip.anywhere", _flip(data, rng, 0, len(data))
    for _ in range(plan["flip_header"]):
        yield "flip.header", _flip(data, rng, 0, header_end)
    for _ in range(plan["flip_data"]):
        yield "flip.tensor_data", _flip(data, rng, header_end, len(data))
    for _ in range(plan["byte"]):
        out = bytearray(data)
        at = rng.randrange(0, header_end) if rng.random() < 0.5 else rng.randrange(len(data))
        out[at] = (out[at] + rng.randrange(1, 256)) % 256
        yield "byte.overwrite", bytes(out)
    for _ in range(plan["truncate"]):
        yield "truncate", data[: rng.randrange(len(data))]
    for _ in range(plan["extend"]):
        yield "extend", data + bytes(rng.randrange(256) for _ in range(rng.choice([1, 7, 8, 64])))
    for _ in range(plan["header_edit"]):
        yield _header_edit(data, rng)
    for _ in range(plan["swap"]):
        yield _swap_data(data, rng)
    for name, edited, redigest_ok in _doc_edits(p.document, rng):
        yield f"doc.naive.{name}", _with_document(p, edited, redigest=False)
        if redigest_ok:
            yield f"doc.redigest.{name}", _with_document(p, edited, redigest=True)
    for _ in range(plan["benign_doc"]):
        keys = list(p.document)
        rng.shuffle(keys)
        text = json.dumps({key: p.document[key] for key in keys}, indent=rng.choice([None, 2]))
        yield "benign.doc_noncanonical", _with_document(p, p.document, redigest=False, text=text)
        notes = copy.deepcopy(p.document)
        notes["provenance"]["note"] = f"copied on host {rng.randrange(1000)}"
        yield "benign.provenance_note", _with_document(p, notes, redigest=True)


# ---------------------------------------------------------------------------------------------------------
# the oracle
# ---------------------------------------------------------------------------------------------------------


def _outputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


def _semantics(artifact) -> tuple:
    """Everything that decides what the deployed network computes, beyond the weights themselves."""
    return (
        artifact.arch,
        artifact.arch_args,
        artifact.k,
        artifact.seed,
        artifact.init,
        artifact.scale_fan,
        artifact.spec,
        sorted(artifact.masks),
        sorted(artifact.bn_stats),
    )


def _fuzz(data: bytes, plan: dict[str, int], seed: int) -> tuple[Counter, dict, list]:
    original = artifact_from_bytes(data, "original")
    reference_model = materialize(original)
    spec = original.spec
    x = torch.randn(3, spec.channels, spec.height, spec.width, generator=torch.Generator().manual_seed(seed))
    reference = _outputs(reference_model, x)
    counts, by_class, silent = Counter(), {}, []
    for index, (kind, mutated) in enumerate(_mutations(data, random.Random(seed), plan)):
        counts["tried"] += 1
        group = by_class.setdefault(
            kind.split(".")[0] + "." + kind.split(".")[1] if kind.count(".") else kind, Counter()
        )
        if mutated == data:
            outcome = "unchanged"  # e.g. a header edit that happened to rebuild the same bytes
        else:
            try:
                artifact = artifact_from_bytes(mutated, "mutant")
                model = materialize(artifact)
            except MaskforgeError as exc:
                message = str(exc)
                assert message.strip() and "Traceback" not in message, (index, kind, message)
                outcome = "rejected"
            except Exception as exc:  # noqa: BLE001 - anything but MaskforgeError is a bug
                silent.append((index, kind, f"crash {type(exc).__name__}: {exc}"))
                outcome = "crash"
            else:
                same = torch.equal(_outputs(model, x), reference) and _semantics(artifact) == _semantics(original)
                same = same and all(torch.equal(artifact.masks[n], original.masks[n]) for n in original.masks)
                same = same and all(torch.equal(artifact.bn_stats[n], original.bn_stats[n]) for n in original.bn_stats)
                outcome = "identical" if same else "silent"
                if not same:
                    silent.append((index, kind, "loaded but differs"))
        counts[outcome] += 1
        group[outcome] += 1
    return counts, by_class, silent


_FC_PLAN = {
    "flip_any": 250,
    "flip_header": 250,
    "flip_data": 40,
    "byte": 80,
    "truncate": 80,
    "extend": 10,
    "header_edit": 90,
    "swap": 40,
    "benign_doc": 5,
}
_BN_PLAN = {
    "flip_any": 60,
    "flip_header": 60,
    "flip_data": 60,
    "byte": 30,
    "truncate": 30,
    "extend": 5,
    "header_edit": 40,
    "swap": 40,
    "benign_doc": 3,
}


def test_fuzz_rejects_or_reproduces_every_mutation(fc_artifact, bn_artifact, capsys):
    totals, table, problems = Counter(), {}, []
    for label, data, plan, seed in (
        ("fc (searched)", fc_artifact, _FC_PLAN, SEED),
        ("tiny conv+BN", bn_artifact, _BN_PLAN, SEED + 1),
    ):
        counts, by_class, silent = _fuzz(data, plan, seed)
        totals.update(counts)
        problems += [(label, *entry) for entry in silent]
        for kind, outcome in by_class.items():
            table.setdefault(kind, Counter()).update(outcome)
    with capsys.disabled():
        print(
            f"\n[fuzz] mutations tried {totals['tried']}, rejected {totals['rejected']}, identical "
            f"{totals['identical']}, unchanged {totals['unchanged']}, silent {totals['silent']}, "
            f"crashes {totals['crash']}"
        )
        for kind in sorted(table):
            row = table[kind]
            print(
                f"[fuzz]   {kind:28s} "
                + ", ".join(
                    f"{key} {row[key]}" for key in ("rejected", "identical", "unchanged", "silent", "crash") if row[key]
                )
            )
    assert totals["tried"] >= 1000
    assert totals["silent"] == 0 and totals["crash"] == 0, problems[:10]
    # the benign rewrites really load (the oracle is not "reject everything")
    assert table["benign.header_reorder"]["identical"] + table["benign.doc_noncanonical"]["identical"] > 0
    assert totals["rejected"] > 0.9 * totals["tried"]


def test_consistent_seed_edit_is_caught_by_the_weight_digests(fc_artifact):
    """With the document digest recomputed, a changed seed passes loading but not materializing."""
    p = Parsed.of(fc_artifact)
    edited = copy.deepcopy(p.document)
    edited["seed"] += 1
    artifact = artifact_from_bytes(_with_document(p, edited, redigest=True), "edited")
    with pytest.raises(MaskforgeError, match=r"regenerated weights of layer \S+ do not match"):
        materialize(artifact)


@pytest.mark.parametrize(
    "field, value, message",
    [
        (
            "format_version",
            2,
            r"^edited uses artifact format version 2, newer than this maskforge reads \(1\); "
            r"upgrade maskforge$",
        ),
        ("k", 1.5, r"^edited: k must be <= 1, got 1\.5$"),
        ("seed", -3, r"^edited: seed must be >= 0, got -3$"),
        ("seed", 2**63, r"^edited: seed must be <= 9223372036854775807, got 9223372036854775808$"),
        ("seed", True, r"^edited: seed must be an integer, got True$"),
        ("comment", "x", r"^edited: unknown field comment$"),
    ],
)
def test_schema_messages_name_the_field(fc_artifact, field, value, message):
    p = Parsed.of(fc_artifact)
    edited = copy.deepcopy(p.document)
    edited[field] = value
    with pytest.raises(MaskforgeError, match=message):
        artifact_from_bytes(_with_document(p, edited, redigest=True), "edited")

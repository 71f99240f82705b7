"""docs/FORMAT.md is complete and true: this test parses it and checks every `example-…` block and the
architecture definitions against implementations written here from the document's text alone (not from
maskforge's code), and against maskforge.

* the generator examples: stream key, blocks, sigma, signs (an independent SHA-256 + SplitMix64 here);
* the kept-count rule, canonical number formatting and the document digest (an independent canonical-JSON
  writer here);
* every registered architecture: parameter names and shapes, batch norms, and the forward computation
  (an independent functional network built from section 2's rules);
* a byte-exact file: an independent mini-writer (section 3.1-3.5) produces the documented worked example,
  and maskforge writes the same bytes; the header layout is checked with batch-norm tensors too.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import struct
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from maskforge import archs, regen
from maskforge.artifact import artifact_bytes, build_artifact
from maskforge.container import canonical_json, document_digest
from maskforge.layers import MaskedConv2d, MaskedLinear, NonAffineBatchNorm2d, batchnorm_modules, kept_count
from maskforge.layers import masked_modules
from maskforge.materialization import plain_structure
from maskforge.schema import PROVENANCE_FIELDS, ArtifactDocument, InputSpec

FORMAT = (Path(__file__).resolve().parents[1] / "docs" / "FORMAT.md").read_text(encoding="utf-8")
M64 = (1 << 64) - 1


def _examples(kind: str) -> list[str]:
    blocks = re.findall(rf"^```example-{kind}\n(.*?)^```", FORMAT, flags=re.S | re.M)
    assert blocks, f"FORMAT.md has no example-{kind} block"
    return blocks


def _pairs(block: str) -> dict[str, str]:
    return dict(line.split(" = ", 1) for line in block.strip().splitlines())


# ---------------------------------------------------------------------------------------------------------
# Section 1: the generator
# ---------------------------------------------------------------------------------------------------------


def _key(seed: int, name: str) -> int:
    digest = hashlib.sha256(b"maskforge/regen/v1\x00" + str(seed).encode() + b"\x00" + name.encode()).digest()
    return int.from_bytes(digest[:8], "little")


def _block(key: int, j: int) -> int:
    z = (key + (j + 1) * 0x9E3779B97F4A7C15) & M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def _f32_bits(value: float) -> int:
    return struct.unpack("<I", struct.pack("<f", value))[0]


def _signed_constant_bytes(seed: int, name: str, shape) -> bytes:
    """float32 little-endian bytes of a signed-constant tensor, from section 1 alone."""
    count = math.prod(shape)
    magnitude = struct.pack("<f", math.sqrt(2.0 / float(math.prod(shape[1:]))))
    negative = struct.pack("<f", -struct.unpack("<f", magnitude)[0])
    key = _key(seed, name)
    blocks = [_block(key, j) for j in range((count + 63) // 64)]
    return b"".join(magnitude if blocks[i // 64] >> (i % 64) & 1 else negative for i in range(count))


def test_generator_examples():
    for example in map(_pairs, _examples("generator")):
        seed, name, shape = int(example["seed"]), example["name"], tuple(map(int, example["shape"].split(",")))
        distribution = example.get("distribution", "signed_constant")
        k, scale_fan = float(example.get("k", 1.0)), example.get("scale_fan") == "true"
        weights = regen.generate(seed, name, shape, distribution, k=k, scale_fan=scale_fan)
        assert regen.weight_digest(weights) == example["digest"]
        if distribution == "signed_constant":
            key = _key(seed, name)
            assert f"{key:016x}" == example["key"] == f"{regen.stream_key(seed, name):016x}"
            assert [f"{_block(key, j):016x}" for j in (0, 1)] == [example["block0"], example["block1"]]
            assert f"{_f32_bits(math.sqrt(2.0 / math.prod(shape[1:]))):08x}" == example["sigma_f32_bits"]
            assert " ".join("+" if _block(key, 0) >> i & 1 else "-" for i in range(8)) == example["signs0_7"]
            assert hashlib.sha256(_signed_constant_bytes(seed, name, shape)).hexdigest() == example["digest"]
        else:
            assert weights.reshape(-1)[:4].tolist() == [float(v) for v in example["first4"].split(",")]


# ---------------------------------------------------------------------------------------------------------
# Section 3.3 and 3.5: kept counts, canonical JSON
# ---------------------------------------------------------------------------------------------------------


def _round_half_even(value: float) -> int:
    floor = math.floor(value)
    rest = value - floor
    return floor + (1 if rest > 0.5 or (rest == 0.5 and floor % 2 == 1) else 0)


def test_kept_count_examples():
    rows = re.findall(r"k = ([\d.]+), n = (\d+) -> (\d+)", _examples("kept")[0])
    assert len(rows) >= 6
    for k, n, kept in rows:
        k, n, kept = float(k), int(n), int(kept)
        assert max(1, _round_half_even(k * n)) == kept == kept_count(n, k), (k, n)


def _global_rule(layers: list[list[float]], k: float) -> list[list[int]]:
    """Section 3.3's global rule, written out: reserve each layer's best, then the rest by
    (-|score|, layer, index), NaN above every number."""

    def rank(layer: int, index: int) -> tuple:
        value = layers[layer][index]
        return (0, 0.0, layer, index) if math.isnan(value) else (1, -value, layer, index)

    total = sum(map(len, layers))
    budget = max(len(layers), max(1, _round_half_even(k * total)))
    reserved = {min(((i, j) for j in range(len(layer))), key=lambda ij: rank(*ij)) for i, layer in enumerate(layers)}
    rest = sorted(
        ((i, j) for i, layer in enumerate(layers) for j in range(len(layer)) if (i, j) not in reserved),
        key=lambda ij: rank(*ij),
    )
    kept = reserved | set(rest[: budget - len(reserved)])
    return [[int((i, j) in kept) for j in range(len(layer))] for i, layer in enumerate(layers)]


def _bracketed(text: str) -> list[list[float]]:
    return [[float(v) for v in group.split(",")] for group in re.findall(r"\[([^\]]*)\]", text)]


def test_global_topk_examples():
    """The documented global rule (an oracle written from the text), its examples, and maskforge's selector."""
    from maskforge.topk import MASKERS, global_topk_masks

    rows = re.findall(r"k = ([\d.]+); (.*) -> (.*)", _examples("global")[0])
    assert len(rows) >= 4
    for k, scores, masks in rows:
        k, scores, masks = float(k), _bracketed(scores), [[int(v) for v in m] for m in _bracketed(masks)]
        assert _global_rule(scores, k) == masks, (k, scores)
        for masker in MASKERS:
            got = global_topk_masks([torch.tensor(layer) for layer in scores], k, masker=masker)
            assert [m.int().tolist() for m in got] == masks, (masker, k, scores)


def _number(token: str) -> str:
    """Section 3.5's number rule, written out: integers stay, others are the shortest round-trip digits."""
    if not re.search(r"[.eE]", token):
        return str(int(token))
    value = float(token)
    if value == 0:
        return "-0.0" if math.copysign(1.0, value) < 0 else "0.0"
    for precision in range(1, 18):  # the shortest digit string that reads back as the value
        text = f"{abs(value):.{precision - 1}e}"
        if float(text) == abs(value):
            break
    mantissa, exponent = text.split("e")
    digits, exponent = mantissa.replace(".", "").rstrip("0") or "0", int(exponent)
    sign = "-" if value < 0 else ""
    if -4 <= exponent < 16:
        if exponent >= 0:
            whole, fraction = digits[: exponent + 1].ljust(exponent + 1, "0"), digits[exponent + 1 :]
        else:
            whole, fraction = "0", "0" * (-exponent - 1) + digits
        return f"{sign}{whole}.{fraction or '0'}"
    body = digits[0] + ("." + digits[1:] if len(digits) > 1 else "")
    return f"{sign}{body}e{'+' if exponent >= 0 else '-'}{abs(exponent):02d}"


def test_number_examples():
    rows = [line.split(" -> ") for line in _examples("numbers")[0].strip().splitlines()]
    assert len(rows) >= 12
    for token, canonical in rows:
        assert _number(token) == canonical, token
        assert canonical_json(json.loads(token)) == canonical, token  # what maskforge writes


def _string(text: str) -> str:
    short = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t", "\b": "\\b", "\f": "\\f"}
    out = []
    for char in text:
        if char in short:
            out.append(short[char])
        elif ord(char) < 0x20 or ord(char) > 0x7F:
            encoded = char.encode("utf-16-be")
            out += [f"\\u{int.from_bytes(encoded[i : i + 2], 'big'):04x}" for i in range(0, len(encoded), 2)]
        else:
            out.append(char)
    return '"' + "".join(out) + '"'


class _Token(str):
    """A JSON number as written (its kind, integer or not, decides its canonical form)."""


def _canonical(value) -> str:
    """Section 3.5's canonical JSON, written out (numbers keep their written kind via _Token)."""
    if isinstance(value, dict):
        return "{" + ",".join(f"{_string(key)}:{_canonical(value[key])}" for key in sorted(value)) + "}"
    if isinstance(value, list):
        return "[" + ",".join(_canonical(item) for item in value) + "]"
    if isinstance(value, _Token):
        return _number(value)
    if isinstance(value, str):
        return _string(value)
    return {True: "true", False: "false", None: "null"}[value]


def test_document_example_and_its_digest():
    text = _examples("document")[0]
    document = json.loads(text, parse_int=_Token, parse_float=_Token)
    body = {key: item for key, item in document.items() if key != "digests"}
    canonical = _examples("canonical")[0].strip()
    assert _canonical(body) == canonical
    digest = _examples("digest")[0].strip()
    assert hashlib.sha256(canonical.encode("ascii")).hexdigest() == digest
    assert document_digest(json.loads(text)) == digest  # maskforge agrees


# ---------------------------------------------------------------------------------------------------------
# Section 2: every architecture, from the document's rules
# ---------------------------------------------------------------------------------------------------------

CONVNETS = {
    name: [int(w) for w in widths.split(",")]
    for name, widths in map(lambda line: line.split(" = "), _examples("convnets")[0].strip().splitlines())
}
RESNETS = {}
for _line in _examples("resnets")[0].strip().splitlines():
    _name, _spec = _line.split(" = ")
    _block_kind, _counts, _factor = (part.strip() for part in _spec.split(","))
    RESNETS[_name] = (_block_kind, [int(c) for c in _counts.split()], int(_factor))


def _resnet_blocks(name: str, channels: int, small: bool):
    """(block name, kind, inplanes, planes, width, stride, downsample) for every block, per section 2.4."""
    kind, counts, factor = RESNETS[name]
    expansion = 1 if kind == "basic" else 4
    inplanes = 64
    for stage, (planes, stride, count) in enumerate(zip((64, 128, 256, 512), (1, 2, 2, 2), counts), start=1):
        for index in range(count):
            s = stride if index == 0 else 1
            downsample = s != 1 or inplanes != planes * expansion
            yield f"layer{stage}.{index}", kind, inplanes, planes, planes * factor, s, downsample
            inplanes = planes * expansion


def expected_structure(name: str, c: int, k: int, h: int, w: int, multiplier: float = 1.0) -> tuple[dict, dict]:
    """({parameter: shape}, {batch norm: channels}) of architecture `name`, from section 2 alone
    (`multiplier`: the width W of section 2.5, for fc and the Conv-n)."""

    def units(u: int) -> int:
        return max(1, _round_half_even(u * multiplier))

    if name == "fc":
        return {
            "1.weight": [units(300), c * h * w],
            "3.weight": [units(100), units(300)],
            "5.weight": [k, units(100)],
        }, {}
    if name in CONVNETS:
        params, previous, hidden = {}, c, units(256)
        for j, width in enumerate(units(u) for u in CONVNETS[name]):
            params[f"features.{5 * j}.weight"] = [width, previous, 3, 3]
            params[f"features.{5 * j + 2}.weight"] = [width, width, 3, 3]
            previous = width
        stages = len(CONVNETS[name])
        params.update(
            {
                "classifier.1.weight": [hidden, previous * (h >> stages) * (w >> stages)],
                "classifier.3.weight": [hidden, hidden],
                "classifier.5.weight": [k, hidden],
            }
        )
        return params, {}
    small = max(h, w) <= 64
    params, norms = {"conv1.weight": [64, c, 3, 3] if small else [64, c, 7, 7]}, {"bn1": 64}
    for block, kind, inplanes, planes, width, _, downsample in _resnet_blocks(name, c, small):
        if kind == "basic":
            convs = [("conv1", [planes, inplanes, 3, 3]), ("conv2", [planes, planes, 3, 3])]
        else:
            convs = [
                ("conv1", [width, inplanes, 1, 1]),
                ("conv2", [width, width, 3, 3]),
                ("conv3", [planes * 4, width, 1, 1]),
            ]
        for index, (conv, shape) in enumerate(convs, start=1):
            params[f"{block}.{conv}.weight"] = shape
            norms[f"{block}.bn{index}"] = shape[0]
        if downsample:
            out = convs[-1][1][0]
            params[f"{block}.downsample.0.weight"] = [out, inplanes, 1, 1]
            norms[f"{block}.downsample.1"] = out
    params["fc.weight"] = [k, 512 * (1 if RESNETS[name][0] == "basic" else 4)]
    return params, norms


REAL_ARCHS = sorted(name for name in archs.ARCHS if not name.startswith("_"))


def test_every_registered_architecture_is_defined():
    assert set(REAL_ARCHS) == {"fc", *CONVNETS, *RESNETS}


@pytest.mark.parametrize("name", REAL_ARCHS)
def test_architecture_structure_follows_the_definition(name):
    sizes = [(28, 28), (65, 80)] if name in RESNETS else [(28, 28), (32, 16)]
    for (h, w), (c, k) in zip(sizes, [(1, 10), (3, 7)]):
        with torch.device("meta"):
            model = archs.build_structure(name, archs.arch_args(c, k, (h, w)), 0.5)
        params, norms = expected_structure(name, c, k, h, w)
        assert {n + ".weight": list(m.weight.shape) for n, m in masked_modules(model).items()} == params
        assert {n: m.num_features for n, m in batchnorm_modules(model).items()} == norms
        for module in batchnorm_modules(model).values():
            assert not module.affine and module.eps == 1e-5
        assert all(getattr(m, "bias", None) is None for m in masked_modules(model).values())


def test_width_examples():
    """Section 2.5: each example's shapes follow the width rule, and maskforge builds exactly those."""
    lines = _examples("width")[0].strip().splitlines()
    assert len(lines) >= 4
    for line in lines:
        head, shapes = line.split(": ", 1)
        name, multiplier, channels, size, classes = (part.split(" = ")[-1] for part in head.split(", "))
        h, w = (int(side) for side in size.split("x"))
        stated = {param: json.loads(shape) for param, shape in re.findall(r"(\S+) (\[[\d, ]+\])", shapes)}
        params, _ = expected_structure(name, int(channels), int(classes), h, w, float(multiplier))
        assert stated == params, line
        with torch.device("meta"):
            model = archs.build_structure(
                name, archs.arch_args(int(channels), int(classes), (h, w), float(multiplier)), 0.5
            )
        assert {n + ".weight": list(m.weight.shape) for n, m in masked_modules(model).items()} == stated, line


def _bn(x, stats, name):
    mean, var = stats[f"{name}.running_mean"], stats[f"{name}.running_var"]
    return (x - mean[None, :, None, None]) / torch.sqrt(var[None, :, None, None] + 1e-5)


def independent_forward(name: str, weights: dict, stats: dict, x: torch.Tensor) -> torch.Tensor:
    """Section 2's computation with torch.nn.functional, from the named weights and statistics."""
    if name == "fc":
        x = F.relu(F.linear(x.flatten(1), weights["1.weight"]))
        return F.linear(F.relu(F.linear(x, weights["3.weight"])), weights["5.weight"])
    if name in CONVNETS:
        for j in range(len(CONVNETS[name])):
            x = F.relu(F.conv2d(x, weights[f"features.{5 * j}.weight"], padding=1))
            x = F.max_pool2d(F.relu(F.conv2d(x, weights[f"features.{5 * j + 2}.weight"], padding=1)), 2)
        x = F.relu(F.linear(x.flatten(1), weights["classifier.1.weight"]))
        x = F.relu(F.linear(x, weights["classifier.3.weight"]))
        return F.linear(x, weights["classifier.5.weight"])
    small = max(x.shape[-2:]) <= 64
    x = F.relu(
        _bn(F.conv2d(x, weights["conv1.weight"], stride=1 if small else 2, padding=1 if small else 3), stats, "bn1")
    )
    if not small:
        x = F.max_pool2d(x, 3, stride=2, padding=1)
    for block, kind, _, _, _, stride, downsample in _resnet_blocks(name, x.shape[1], small):
        convs = ["conv1", "conv2"] if kind == "basic" else ["conv1", "conv2", "conv3"]
        out = x
        for index, conv in enumerate(convs, start=1):
            weight = weights[f"{block}.{conv}.weight"]
            strided = (kind == "basic" and index == 1) or (kind != "basic" and index == 2)
            out = _bn(
                F.conv2d(out, weight, stride=stride if strided else 1, padding=weight.shape[-1] // 2),
                stats,
                f"{block}.bn{index}",
            )
            if index < len(convs):
                out = F.relu(out)
        shortcut = x
        if downsample:
            shortcut = _bn(
                F.conv2d(x, weights[f"{block}.downsample.0.weight"], stride=stride), stats, f"{block}.downsample.1"
            )
        x = F.relu(out + shortcut)
    return F.linear(x.mean(dim=(2, 3)), weights["fc.weight"])


@pytest.mark.parametrize(
    "name,size", [("fc", 5), ("conv2", 6), ("conv6", 8), ("resnet18", 8), ("resnet18", 65), ("resnet50", 8)]
)  # wide: only wider layers (the structure test)
def test_architecture_computes_what_the_definition_says(name, size):
    """maskforge's network (as materialize builds it) against the functional one, with random weights."""
    channels, classes = 3, 4
    model = plain_structure(name, archs.arch_args(channels, classes, (size, size)), 0.5)
    model.to_empty(device="cpu")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # weights scaled so that deep networks stay finite; any values would do
        for layer in model.modules():
            if isinstance(layer, (nn.Conv2d, nn.Linear)):
                fan_in = math.prod(layer.weight.shape[1:])
                layer.weight.copy_(torch.randn(layer.weight.shape, generator=generator) / math.sqrt(fan_in))
        for bn in batchnorm_modules(model).values():
            bn.running_mean.copy_(torch.randn(bn.num_features, generator=generator) * 0.1)
            bn.running_var.uniform_(0.5, 1.5, generator=generator)
    state = model.state_dict()
    x = torch.randn(2, channels, size, size, generator=generator)
    with torch.no_grad():
        expected = independent_forward(name, state, state, x)
        actual = model.eval()(x)
    assert actual.shape == (2, classes)
    assert torch.allclose(actual, expected, rtol=1e-4, atol=1e-5), (actual - expected).abs().max()


# ---------------------------------------------------------------------------------------------------------
# Sections 3.1-3.5: a byte-exact file from an independent mini-writer
# ---------------------------------------------------------------------------------------------------------


def _mini_writer(document: dict, tensors: dict[str, tuple[str, list[int], bytes]]) -> bytes:
    """Section 3.1: seal the document (3.4-3.5) and lay the file out exactly as maskforge writes it."""
    document = json.loads(json.dumps(document))
    document["digests"]["tensors"] = {
        name: hashlib.sha256(data).hexdigest() for name, (_, _, data) in sorted(tensors.items())
    }
    body = {key: value for key, value in document.items() if key != "digests"}
    document["digests"]["document"] = hashlib.sha256(_canonical(_tokens(body)).encode()).hexdigest()
    metadata = _canonical(_tokens(document)).replace("\\", "\\\\").replace('"', '\\"')
    order = sorted(tensors, key=lambda name: (tensors[name][0] != "F32", name.encode()))
    entries, offset = [], 0
    for name in order:
        dtype, shape, data = tensors[name]
        entries.append(
            f'"{name}":{{"dtype":"{dtype}","shape":[{",".join(map(str, shape))}],'
            f'"data_offsets":[{offset},{offset + len(data)}]}}'
        )
        offset += len(data)
    header = ('{"__metadata__":{"maskforge":"' + metadata + '"},' + ",".join(entries) + "}").encode()
    header += b" " * (-len(header) % 8)
    return len(header).to_bytes(8, "little") + header + b"".join(tensors[name][2] for name in order)


def _tokens(value):
    """Python values -> the _Token form _canonical expects (ints stay integers, floats stay non-integers)."""
    if isinstance(value, dict):
        return {key: _tokens(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_tokens(item) for item in value]
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    return _Token(repr(value) if isinstance(value, float) else str(value))


def _pack(bits: list[int]) -> bytes:
    out = bytearray((len(bits) + 7) // 8)
    for i, bit in enumerate(bits):
        out[i // 8] |= bit << (i % 8)
    return bytes(out)


def _first_kept_masks(shapes: dict[str, list[int]], k: float) -> dict[str, list[int]]:
    return {
        param: [1 if i < max(1, _round_half_even(k * math.prod(shape))) else 0 for i in range(math.prod(shape))]
        for param, shape in shapes.items()
    }


def _document(arch: str, args: dict, shapes: dict, masks: dict, seed: int, k: float, spec: dict, bn: dict) -> dict:
    return {
        "format": "maskforge-artifact",
        "format_version": 1,
        "arch": {"name": arch, "args": args},
        "input": spec,
        "seed": seed,
        "init": {"distribution": "signed_constant", "scale_fan": False},
        "k": k,
        "generator": {"id": "maskforge-splitmix64", "version": 1},
        "layers": {
            p: {"shape": s, "kept": sum(masks[p]), "density": sum(masks[p]) / math.prod(s), "fan_in": math.prod(s[1:])}
            for p, s in shapes.items()
        },
        "bn": sorted(bn),
        "provenance": {},
        "digests": {
            "weights": {p: hashlib.sha256(_signed_constant_bytes(seed, p, s)).hexdigest() for p, s in shapes.items()}
        },
    }


def _maskforge_bytes(arch, args, masks, bn_stats, seed, k, spec) -> bytes:
    model = archs.create_model(arch, **args, k=k, seed=seed)
    with torch.no_grad():
        for name, layer in masked_modules(model).items():
            layer.scores.copy_(torch.tensor(masks[f"{name}.weight"], dtype=torch.float32).view_as(layer.scores))
        for name, bn in batchnorm_modules(model).items():
            bn.running_mean.copy_(torch.tensor(bn_stats[name][0]))
            bn.running_var.copy_(torch.tensor(bn_stats[name][1]))
    input_spec = InputSpec(
        spec["channels"], spec["height"], spec["width"], spec["mean"], spec["std"], spec["class_names"]
    )
    return artifact_bytes(
        build_artifact(
            model,
            arch=arch,
            arch_args=args,
            spec=input_spec,
            seed=seed,
            init="signed_constant",
            scale_fan=False,
            k=k,
            provenance={},
        )
    )


def test_worked_example_file_is_byte_exact():
    args = {"image_size": [1, 1], "in_channels": 1, "num_classes": 2}
    shapes = {"1.weight": [300, 1], "3.weight": [100, 300], "5.weight": [2, 100]}
    spec = {"channels": 1, "height": 1, "width": 1, "mean": [0.5], "std": [0.25], "class_names": ["a", "b"]}
    masks = _first_kept_masks(shapes, 0.5)
    tensors = {f"mask/{p}": ("U8", [(math.prod(s) + 7) // 8], _pack(masks[p])) for p, s in shapes.items()}
    data = _mini_writer(_document("fc", args, shapes, masks, 7, 0.5, spec, {}), tensors)
    example = _pairs(_examples("file")[0])
    assert (len(data), hashlib.sha256(data).hexdigest()) == (int(example["bytes"]), example["sha256"])
    assert _maskforge_bytes("fc", args, masks, {}, 7, 0.5, spec) == data


@pytest.fixture
def tiny_bn_arch():
    def build(in_channels, num_classes, image_size, k=0.5):
        return nn.Sequential(
            MaskedConv2d(in_channels, 3, 3, padding=1, k=k),
            NonAffineBatchNorm2d(3),
            nn.ReLU(),
            nn.Flatten(),
            MaskedLinear(3 * image_size[0] * image_size[1], num_classes, k=k),
        )

    archs.register_arch("_format_bn", "test-only conv + BN")(build)
    yield "_format_bn"
    archs.ARCHS.pop("_format_bn")


def test_file_with_batch_norm_is_byte_exact(tiny_bn_arch):
    """F32 statistics come before the U8 masks; names sorted within each dtype (section 3.1)."""
    args = {"image_size": [2, 2], "in_channels": 1, "num_classes": 3}
    shapes = {"0.weight": [3, 1, 3, 3], "4.weight": [3, 12]}
    spec = {"channels": 1, "height": 2, "width": 2, "mean": [0.1], "std": [1e-05], "class_names": ["x", "y", "é"]}
    stats = {"1": ([0.5, -1.25, 3.0], [1.0, 0.25, 2.5])}
    masks = _first_kept_masks(shapes, 0.3)
    tensors = {f"mask/{p}": ("U8", [(math.prod(s) + 7) // 8], _pack(masks[p])) for p, s in shapes.items()}
    for index, stat in enumerate(("running_mean", "running_var")):
        tensors[f"bn/1.{stat}"] = ("F32", [3], struct.pack("<3f", *stats["1"][index]))
    data = _mini_writer(_document(tiny_bn_arch, args, shapes, masks, 11, 0.3, spec, {"1"}), tensors)
    assert _maskforge_bytes(tiny_bn_arch, args, masks, stats, 11, 0.3, spec) == data


# ---------------------------------------------------------------------------------------------------------
# Section 3.4: the tables are the schema's
# ---------------------------------------------------------------------------------------------------------


def _table_after(heading: str) -> list[list[str]]:
    section = FORMAT[FORMAT.index(heading) :]
    table = re.search(r"^\|.*?(?=^\s*$)", section, flags=re.S | re.M).group(0)
    return [[cell.strip() for cell in row.strip("|").split("|")] for row in table.strip().splitlines()[2:]]


def test_document_and_provenance_tables_match_the_schema():
    fields = {re.sub(r"`", "", row[0]).split(".")[0] for row in _table_after("| field | type |")}
    assert fields == {field for field in ArtifactDocument.__dataclass_fields__}
    documented = set()
    for row in _table_after("| member | type |"):
        documented |= {name.strip(" `") for name in row[0].split(",")}
    assert documented == set(PROVENANCE_FIELDS)

"""Global top-k end to end (issue 12 item 5): `maskforge search --topk global` -> artifact -> verify -> export
-> onnxruntime, and the loader's rule for global artifacts (the layers' kept counts add up to the rule's
total, every layer keeps at least one).

Oracles: the searched masks are the global rule applied to the checkpoint's scores (tests/test_global_topk's
lexsort oracle, which shares no code with the selectors); onnxruntime's logits are those of the artifact's
search-time masked model (`Artifact.create_model`, which selects its masks again with the global rule).
"""

from __future__ import annotations

import re

import numpy as np
import onnxruntime as ort
import pytest
import torch
from typer.testing import CliRunner

from maskforge import archs
from maskforge.artifact import apply_masks, build_artifact, load_artifact, save_artifact
from maskforge.checkpoint import CHECKPOINT_NAME, load_checkpoint
from maskforge.cli import app
from maskforge.data import InputSpec
from maskforge.errors import MaskforgeError
from maskforge.layers import masked_modules, set_topk
from test_global_topk import global_oracle

K = 0.1


def _cli(*argv: str):
    result = CliRunner().invoke(app, [*argv], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    return result


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    run = tmp_path_factory.mktemp("global") / "run"
    _cli(
        "search",
        "--arch",
        "fc",
        "--k",
        str(K),
        "--topk",
        "global",
        "--max-steps",
        "12",
        "--epochs",
        "1",
        "--batch-size",
        "128",
        "--device",
        "cpu",
        "--out",
        str(run),
        "--keep-checkpoint",
        "-q",
    )
    return run


def test_the_artifact_records_the_rule_and_what_it_produced(searched):
    artifact = load_artifact(searched / "artifact.safetensors")
    assert artifact.topk == "global" and artifact.document["topk"] == "global"
    layers = artifact.document["layers"]
    sizes = [mask.numel() for mask in artifact.masks.values()]
    assert artifact.kept_weights == max(len(sizes), round(K * sum(sizes)))  # the rule's total
    for param, mask in artifact.masks.items():
        assert layers[param]["kept"] == int(mask.sum()) and layers[param]["density"] == int(mask.sum()) / mask.numel()
    assert len({info["density"] for info in layers.values()}) == len(layers)  # per-layer densities differ
    # the masks are the global rule on the final scores (all layers, in module order)
    scores = load_checkpoint(searched / CHECKPOINT_NAME).tensors
    names = list(masked_modules(artifact.structure))
    expected = global_oracle([torch.as_tensor(np.asarray(scores[f"scores/{name}.scores"])) for name in names], K)
    for name, want in zip(names, expected):
        assert torch.equal(artifact.masks[f"{name}.weight"], want), name


def test_verify_export_and_onnxruntime(searched, tmp_path):
    path = searched / "artifact.safetensors"
    verified = _cli("verify", str(path))
    assert verified.stdout.rstrip().splitlines()[-1].startswith("  artifact digest: ")
    onnx_path = tmp_path / "global.onnx"
    _cli("export", str(path), "--out", str(onnx_path))
    _cli("verify", str(onnx_path), "--artifact", str(path))
    artifact = load_artifact(path)
    model = artifact.create_model()
    for name, layer in masked_modules(model).items():  # the global rule selects the stored masks again
        assert torch.equal(layer.mask(), artifact.masks[f"{name}.weight"]), name
    x = torch.randn(32, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        want = model(x).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------------------
# the loader's rule
# ---------------------------------------------------------------------------------------------------------


def _fc_global(k: float = 0.3):
    args = archs.arch_args(1, 3, (8, 8))
    model = archs.create_model("fc", **args, k=k, seed=5)
    set_topk(model, "global")
    spec = InputSpec(1, 8, 8, (0.5,), (0.25,), ("a", "b", "c"))
    return model, dict(arch="fc", arch_args=args, spec=spec, seed=5, init="signed_constant", scale_fan=False, k=k)


def test_a_global_artifact_whose_total_breaks_the_rule_is_refused(tmp_path):
    model, fields = _fc_global()
    good = build_artifact(model, **fields, topk="global")
    load_artifact(save_artifact(good, tmp_path / "good.safetensors"))
    # one weight fewer in the first layer: every count is in range, the total is not the rule's
    first = next(iter(masked_modules(model).values()))
    mask = first.mask().clone()
    mask.view(-1)[int(torch.nonzero(mask.view(-1))[0])] = False
    first.mask = lambda: mask
    bad = save_artifact(build_artifact(model, **fields, topk="global"), tmp_path / "bad.safetensors")
    sizes = [m.numel() for m in good.masks.values()]
    with pytest.raises(MaskforgeError) as caught:
        load_artifact(bad)
    assert str(caught.value) == (
        f"{bad}: the layers keep {good.kept_weights - 1:,} weights in all, global top-k "
        f"with k=0.3 over {sum(sizes):,} weights in 3 layers keeps {good.kept_weights:,}"
    )


def test_apply_masks_follows_the_model_rule():
    model, fields = _fc_global(0.3)
    masks = build_artifact(model, **fields, topk="global").masks
    fresh, _ = _fc_global(0.3)
    apply_masks(fresh, masks)
    assert all(torch.equal(layer.mask(), masks[f"{name}.weight"]) for name, layer in masked_modules(fresh).items())
    starved = dict(masks)
    name = next(iter(starved))
    starved[name] = torch.zeros_like(starved[name])
    with pytest.raises(MaskforgeError) as caught:
        apply_masks(fresh, starved)
    assert str(caught.value) == "masks: layer 1 keeps no weight; global top-k keeps at least one per layer"
    per_layer = archs.create_model("fc", **fields["arch_args"], k=0.3, seed=5)  # per-layer: each count checked
    with pytest.raises(MaskforgeError) as caught:
        apply_masks(per_layer, masks)
    assert re.fullmatch(r"layer 1: mask keeps \d+ weights, k=0.3 requires 5760", str(caught.value))

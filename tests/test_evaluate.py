"""Tests for `maskforge.evaluate` (the library): accuracy, top-k, per-class accuracy and the confusion matrix
against independent computations (the search-time masked model in PyTorch, a separate onnxruntime session,
numpy's argsort, a Python count), agreement with a reference, exact latency run counts, the memory probe
against a known initializer size, export-mode metadata, ONNX files without metadata, and the mode
comparison."""

from __future__ import annotations

import collections
import json
import re
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from eval_helpers import searched_fc
from maskforge.archs import arch_args, create_model
from maskforge.cli.eval_tables import refused_lines
from maskforge.artifact import build_artifact, load_artifact, save_artifact
from maskforge.data import InputSpec, load_data
from maskforge.errors import MaskforgeError
from maskforge.evaluation import LatencyOptions, compare, evaluate, write_report
from maskforge.export import EXPORT_MODES, ExportMode, export_onnx
from maskforge.evaluation.timing import block_sizes, probe_footprint

FC_MACS_28 = 784 * 300 + 300 * 100 + 100 * 10  # LeNet 300-100 on 1x28x28: one MAC per weight


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A short real search of the MLP on the demo data (a few seconds): artifact + its ONNX exports."""
    out = tmp_path_factory.mktemp("eval")
    searched_fc(out, steps=15)
    return out


def _heldout(spec: InputSpec) -> tuple[np.ndarray, np.ndarray]:
    """The demo held-out split, normalized here with numpy from the spec: (float32 [N, C, H, W], labels)."""
    heldout = load_data("mnist5k").heldout
    images = heldout.images.numpy().astype(np.float32) / np.float32(255)
    mean = np.asarray(spec.mean, dtype=np.float32).reshape(1, -1, 1, 1)
    std = np.asarray(spec.std, dtype=np.float32).reshape(1, -1, 1, 1)
    return (images - mean) / std, heldout.labels.numpy()


def _search_time_logits(artifact_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Oracle: the masked search-time model (not the materialized one, not onnxruntime) on the held-out split."""
    artifact = load_artifact(artifact_path)
    x, labels = _heldout(artifact.spec)
    with torch.no_grad():
        return artifact.create_model()(torch.from_numpy(x)).numpy(), labels


def _ort_logits(onnx_path: Path, x: np.ndarray) -> np.ndarray:
    """Oracle: a separate onnxruntime session with default options."""
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def test_artifact_accuracy_matches_an_independent_pytorch_computation(run):
    report = evaluate(run / "artifact.safetensors", batch_size=100, latency=None)
    logits, labels = _search_time_logits(run / "artifact.safetensors")
    top5 = np.argsort(-logits, axis=1)[:, :5]
    acc = report.accuracy
    assert acc.examples == len(labels) == 1000
    assert acc.correct == int((top5[:, 0] == labels).sum()) and acc.k == 5
    assert acc.correct_topk == int((top5 == labels[:, None]).any(axis=1).sum())
    assert acc.top1 == pytest.approx(acc.correct / 1000) and acc.topk == pytest.approx(acc.correct_topk / 1000)
    # the materialized model (the float32 reference) and onnxruntime agree example for example
    assert report.agreement.reference_correct == acc.correct and report.agreement.argmax_agreement == 1.0
    assert report.agreement.top1_difference == 0.0 and report.agreement.max_abs_diff < 1e-4
    # ... and with the held-out accuracy the search recorded
    assert acc.search_heldout_acc == pytest.approx(acc.top1)
    # an artifact is evaluated in the default export mode (docs/DEPLOY.md: regen fp32 where it applies)
    assert report.model.kind == "artifact" and (report.model.storage, report.model.precision) == ("regen", "fp32")


def test_confusion_matrix_and_per_class_accuracy_against_a_separate_onnxruntime_run(run):
    report = evaluate(run / "model.dense.onnx", batch_size=7, latency=None)  # 7 does not divide 1000
    spec = load_artifact(run / "artifact.safetensors").spec
    x, labels = _heldout(spec)
    predicted = _ort_logits(run / "model.dense.onnx", x).argmax(axis=1)
    counts = collections.Counter(zip(labels.tolist(), predicted.tolist()))
    expected = [[counts[(true, guess)] for guess in range(10)] for true in range(10)]
    assert report.accuracy.confusion == expected
    for index, result in enumerate(report.accuracy.per_class):
        in_class = labels == index
        assert result.name == str(index) and result.examples == int(in_class.sum()) == 100
        assert result.correct == int((predicted[in_class] == index).sum())
        assert result.accuracy == pytest.approx(result.correct / result.examples)
        wrong = collections.Counter(predicted[in_class & (predicted != index)].tolist())
        assert result.confused_with == (str(max(sorted(wrong), key=wrong.get)) if wrong else None)
    assert sum(r.correct for r in report.accuracy.per_class) == report.accuracy.correct


def test_onnx_files_read_their_metadata_sizes_and_compute(run):
    artifact = load_artifact(run / "artifact.safetensors")
    logits, labels = _search_time_logits(run / "artifact.safetensors")
    for name, storage in (("model.onnx", "compact"), ("model.dense.onnx", "dense")):
        report = evaluate(run / name, batch_size=128, latency=None)
        assert report.accuracy.correct == int((logits.argmax(1) == labels).sum())
        assert (report.model.kind, report.model.storage, report.model.precision) == ("onnx", storage, "fp32")
        assert report.model.arch == "fc" and report.model.k == 0.5 and report.agreement is None
        size = report.size
        assert size.onnx_bytes == (run / name).stat().st_size and size.artifact_bytes == artifact.file_bytes
        assert size.masked_weights == artifact.masked_weights == 266_200
        assert size.onnx_bits_per_weight == pytest.approx(8 * size.onnx_bytes / 266_200)
        assert size.dense_float32_bytes == 4 * 266_200  # the MLP has no batch norm
        assert report.compute.params_kept == artifact.kept_weights and report.compute.macs_dense == FC_MACS_28
        assert report.compute.macs_effective == round(FC_MACS_28 * artifact.kept_weights / 266_200)


def test_a_reference_file_gives_agreement_counted_independently(run, tmp_path):
    # a different model: the dense export with the last layer's weights reversed along the class axis
    proto = onnx.load(str(run / "model.dense.onnx"))
    last = [t for t in proto.graph.initializer if len(t.dims) == 2 and 10 in t.dims][-1]
    weight = numpy_helper.to_array(last)
    last.CopyFrom(
        numpy_helper.from_array(
            np.ascontiguousarray(np.flip(weight, axis=0 if weight.shape[0] == 10 else 1)), last.name
        )
    )
    other = tmp_path / "other.onnx"
    onnx.save(proto, str(other))
    report = evaluate(other, reference=run / "model.dense.onnx", latency=None)
    x, labels = _heldout(load_artifact(run / "artifact.safetensors").spec)
    mine, theirs = _ort_logits(other, x), _ort_logits(run / "model.dense.onnx", x)
    agree = report.agreement
    assert agree.argmax_agreement == pytest.approx(float((mine.argmax(1) == theirs.argmax(1)).mean()))
    assert agree.argmax_agreement < 1.0
    assert agree.reference_correct == int((theirs.argmax(1) == labels).sum())
    assert agree.top1_difference == pytest.approx(
        float((mine.argmax(1) == labels).mean() - (theirs.argmax(1) == labels).mean())
    )
    assert agree.max_abs_diff == pytest.approx(float(np.abs(mine - theirs).max()), rel=1e-6)
    # the artifact as the reference of its own export: full agreement
    same = evaluate(run / "model.onnx", reference=run / "artifact.safetensors", latency=None)
    assert same.agreement.argmax_agreement == 1.0 and "artifact" in same.agreement.reference


def test_latency_runs_are_exact_and_the_probe_reports_start_and_memory(run):
    assert [block_sizes(n, 2) for n in (1, 2, 5, 6, 31)] == [[1], [1, 1], [3, 2], [3, 3], [16, 15]]
    report = evaluate(run / "artifact.safetensors", batch_size=16, latency=LatencyOptions(runs=5), threads=1)
    timing = report.timing
    assert {(t.runtime, t.batch) for t in timing.latency} == {
        (r, b) for r in ("onnxruntime", "pytorch") for b in (1, 16)
    }
    for stats in timing.latency:
        assert stats.runs == 5 == timing.runs_requested
        assert 0 < stats.p50_ms <= stats.p90_ms <= stats.p99_ms
        assert stats.images_per_s == pytest.approx(stats.batch * 1000 / stats.p50_ms)
    assert timing.session_start_ms > 0 and timing.peak_rss_bytes > timing.model_rss_bytes > 0


def test_peak_memory_counts_what_onnxruntime_allocates(tmp_path):
    """A model holding a 64 MiB initializer must cost at least that much more than one holding 1 KiB:
    the probe sees native allocations that Python-level tracing would miss."""

    def model(side: int) -> Path:
        weight = numpy_helper.from_array(np.ones((side, side), dtype=np.float32), "w")
        graph = helper.make_graph(
            [helper.make_node("Flatten", ["x"], ["f"]), helper.make_node("MatMul", ["f", "w"], ["y"])],
            "g",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 1, 1, side])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", side])],
            [weight],
        )
        path = tmp_path / f"m{side}.onnx"
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(path))
        return path

    small, why_small = probe_footprint(model(16), (1, 1, 16), [1], threads=1)
    big, why_big = probe_footprint(model(4096), (1, 1, 4096), [1], threads=1)
    assert why_small is None and why_big is None
    assert big["model_rss_bytes"] - small["model_rss_bytes"] >= 64 * 2**20


def test_three_classes_report_a_top3_not_a_top5(tmp_path):
    spec = InputSpec(1, 8, 8, (0.5,), (0.25,), ("a", "b", "c"))
    args = arch_args(1, 3, (8, 8))
    model = create_model("fc", **args, k=0.5, seed=1)
    artifact = build_artifact(
        model,
        arch="fc",
        arch_args=args,
        spec=spec,
        seed=1,
        init="signed_constant",
        scale_fan=False,
        k=0.5,
        provenance={"data": "mnist5k"},
    )
    path = save_artifact(artifact, tmp_path / "three.safetensors")
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for name in ("a", "b", "c"):
            (tmp_path / "data" / split / name).mkdir(parents=True)
            for i in range(4):
                Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8), "L").save(
                    tmp_path / "data" / split / name / f"{i}.png"
                )
    report = evaluate(path, data=str(tmp_path / "data"), latency=None)
    assert report.accuracy.k == 3 and report.accuracy.topk == 1.0  # the 3 best of 3 classes always hit
    data = report.to_dict()["accuracy"]
    assert data["top3"] == 1.0 and data["correct_top3"] == 12 and "top5" not in data and "topk" not in data
    assert [r.name for r in report.accuracy.per_class] == ["a", "b", "c"]


def test_unknown_export_metadata_is_reported_not_fatal(run, tmp_path):
    proto = onnx.load(str(run / "model.dense.onnx"))
    values = {"maskforge.storage": "hologram", "maskforge.precision": "int3"}
    for entry in proto.metadata_props:  # the export wrote both keys: a newer maskforge's values replace them
        entry.value = values.pop(entry.key, entry.value)
    assert not values
    odd = tmp_path / "odd.onnx"
    onnx.save(proto, str(odd))
    report = evaluate(odd, latency=None)
    assert (report.model.storage, report.model.precision) == ("hologram", "int3")
    assert any("'hologram' is unknown" in note for note in report.model.notes)
    assert any("'int3' is unknown" in note for note in report.model.notes)


def test_onnx_without_metadata_takes_its_size_from_the_graph(run):
    proto = onnx.load(str(run / "model.dense.onnx"))
    del proto.metadata_props[:]
    bare = run / "bare.onnx"
    onnx.save(proto, str(bare))
    with pytest.raises(MaskforgeError, match=r"no maskforge metadata.*give --mean, --std \(Python: mean, std="):
        evaluate(bare, latency=None)
    spec = load_artifact(run / "artifact.safetensors").spec
    report = evaluate(bare, mean=",".join(map(str, spec.mean)), std=list(spec.std), latency=None)
    logits, labels = _search_time_logits(run / "artifact.safetensors")
    assert report.accuracy.correct == int((logits.argmax(1) == labels).sum())
    assert report.model.preprocessing == "given" and report.model.storage == "dense"
    assert report.model.class_names == [str(d) for d in range(10)]  # the data's
    # parameters are counted from the dense initializers themselves
    assert report.compute.params_total == 266_200 and report.compute.params_kept == 133_100
    with pytest.raises(MaskforgeError, match=r"takes 1x28x28 images .* preprocessing gives 1x32x32"):
        evaluate(bare, mean=spec.mean, std=spec.std, size=32, latency=None)


def test_compare_evaluates_every_mode_on_the_same_examples(run, tmp_path):
    modes = EXPORT_MODES + (ExportMode("compact", "fp32", opset=99),)
    table = compare(
        run / "artifact.safetensors", modes=modes, batch_size=32, latency=LatencyOptions(runs=4, rounds=2), threads=1
    )
    logits, labels = _search_time_logits(run / "artifact.safetensors")
    reference_top1 = float((logits.argmax(1) == labels).mean())
    assert [row.mode for row in table.rows] == [
        f"{s} {p}" for p in ("fp32", "int8") for s in ("dense", "compact", "regen")
    ]
    assert list(table.refused) == ["compact fp32 opset 99"]
    assert table.refused["compact fp32 opset 99"].startswith("opset must be an integer from 13 to")
    assert table.reference_top1 == pytest.approx(reference_top1) and table.baseline == "dense fp32"
    for row, mode in zip(table.rows, EXPORT_MODES):
        summary = row.summary()
        assert (summary["storage"], summary["precision"]) == (mode.storage, mode.precision)
        assert summary["bits_per_weight"] == pytest.approx(8 * summary["onnx_bytes"] / 266_200)
        assert summary["top1_difference"] == pytest.approx(summary["top1"] - reference_top1)
        if mode.precision == "fp32":
            assert summary["top1"] == pytest.approx(reference_top1) and summary["argmax_agreement"] == 1.0
        else:  # the export's own check held it to these bounds; the exact figures are checked below
            assert summary["argmax_agreement"] >= 0.95 and summary["int8_weight_max_error"] == 0.0
        for key in (
            "session_start_ms",
            "peak_rss_bytes",
            "throughput_b1",
            "throughput_b32",
            "p50_ms_b1",
            "p99_ms_b32",
            "speedup_b1",
            "speedup_b32",
            "export_seconds",
        ):
            assert summary[key] > 0, key
        timing = row.report.timing
        assert timing.at(32).runs == 4 and len(timing.at(32).block_p50_ms) == 2
        assert len(timing.session_start_runs_ms) == 3
        assert timing.session_start_ms == pytest.approx(float(np.median(timing.session_start_runs_ms)))
    rows = {row.mode: row for row in table.rows}
    # ratios to dense fp32 are medians of per-round ratios: recompute them from the block medians
    base = rows["dense fp32"].report.timing.at(32).block_p50_ms
    regen = rows["regen int8"].report.timing.at(32).block_p50_ms
    assert rows["regen int8"].speedup[32] == pytest.approx(float(np.median(np.divide(base, regen))))
    assert rows["dense fp32"].speedup == {1: 1.0, 32: 1.0}
    sizes = {mode: row.summary()["onnx_bytes"] for mode, row in rows.items()}
    assert sizes["regen fp32"] < sizes["compact fp32"] < sizes["dense fp32"] / 10
    assert sizes["regen int8"] < sizes["compact int8"] < sizes["dense int8"] < sizes["dense fp32"]
    # int8: the same export made here (calibration is deterministic) and run in a separate session
    int8 = export_onnx(run / "artifact.safetensors", tmp_path / "int8.onnx", precision="int8")
    assert int8.file_bytes == sizes["regen int8"]
    x, _ = _heldout(load_artifact(run / "artifact.safetensors").spec)
    predicted = _ort_logits(int8.path, x).argmax(1)
    int8_row = rows["regen int8"].report
    assert int8_row.accuracy.correct == int((predicted == labels).sum())
    assert int8_row.agreement.argmax_agreement == pytest.approx(float((predicted == logits.argmax(1)).mean()))
    written = json.loads(write_report(table, tmp_path / "a" / "b" / "compare.json").read_text())
    assert [r["mode"] for r in written["rows"]] == [row.mode for row in table.rows]
    assert "compact fp32 opset 99" in written["refused"] and written["baseline"] == "dense fp32"
    with pytest.raises(MaskforgeError, match="needs the artifact"):
        compare(run / "model.onnx")


def test_compare_lists_the_modes_an_artifact_cannot_do_as_refused_with_the_reason(tmp_path):
    """kaiming_normal weights: regen is impossible and int8 lossy (refused without the opt-in); dense and
    compact fp32 are still compared."""
    spec = load_data("mnist5k").spec
    args = arch_args(1, 10, (28, 28))
    model = create_model("fc", **args, k=0.5, seed=3, init="kaiming_normal")
    artifact = build_artifact(
        model.eval(),
        arch="fc",
        arch_args=args,
        spec=spec,
        seed=3,
        init="kaiming_normal",
        scale_fan=False,
        k=0.5,
        provenance={"data": "mnist5k"},
    )
    path = save_artifact(artifact, tmp_path / "normal.safetensors")
    table = compare(path, latency=None, memory=False)
    assert [row.mode for row in table.rows] == ["dense fp32", "compact fp32"]
    assert table.modes == [mode.name for mode in EXPORT_MODES]  # the table's columns, refused ones in place
    assert list(table.refused) == ["regen fp32", "dense int8", "compact int8", "regen int8"]
    for mode in ("regen fp32", "regen int8"):
        assert re.match(r"storage 'regen' cannot rebuild kaiming_normal weights", table.refused[mode]), table.refused
    for mode in ("dense int8", "compact int8"):
        assert table.refused[mode].startswith("precision 'int8' of kaiming_normal weights is lossy"), table.refused
    assert all("\n" not in why for why in table.refused.values())
    lines = refused_lines(table)
    assert lines[0] == f"(1) regen fp32: {table.refused['regen fp32']}" and len(lines) == 4

"""Smoke tests of the benchmark scripts: they run and report the documented fields (no timing assertions)."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _run(script: str, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


def test_search_step_fc_json_fields():
    proc = _run(
        "search_step.py", "--arch", "fc", "--repeats", "1", "--inner", "1", "--warmup", "1", "--json", "--threads", "1"
    )
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    assert len(lines) == 1
    record = json.loads(lines[0])
    assert record["arch"] == "fc" and record["batch"] == 128 and record["device"] == "cpu"
    for key in ("search_ms", "dense_ms", "reference_ms", "ratio", "reference_ratio"):
        assert isinstance(record[key], float) and math.isfinite(record[key]) and record[key] > 0, key
    for key in ("search_peak_mb", "dense_peak_mb", "reference_peak_mb"):
        assert isinstance(record[key], (int, float)) and math.isfinite(record[key]), key
    assert math.isclose(record["ratio"], record["search_ms"] / record["dense_ms"], rel_tol=1e-9)
    # the dense twin is the search network at initialization (the same masked weights)
    assert record["init_logit_max_diff"] < 1e-5


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(torch.cuda.is_available(), reason="GPU machines run the real thing")
def test_search_step_cuda_and_epoch_like_skip_cleanly_without_a_gpu(capsys):
    script = _load_script("search_step")
    assert script.main(["--arch", "fc", "--device", "cuda", "--json"]) == 0
    captured = capsys.readouterr()
    assert captured.out == "" and "CUDA is not available" in captured.err
    assert script.main(["--epoch-like"]) == 0
    assert "skipped on CPU" in capsys.readouterr().err


@pytest.mark.slow  # six exports and their checks, `eval --compare` of them: ~10 s on an idle 2-core machine
def test_deploy_json_lines_cover_every_mode(tmp_path):
    """benchmarks/deploy.py on a tiny demo-shaped artifact: one JSON line per mode with the issue's fields."""
    from maskforge.archs import arch_args, create_model
    from maskforge.artifact import build_artifact, save_artifact
    from maskforge.data import load_data

    model = create_model("fc", in_channels=1, num_classes=10, image_size=(28, 28), k=0.5, seed=1)
    artifact = build_artifact(
        model.eval(),
        arch="fc",
        arch_args=arch_args(1, 10, (28, 28)),
        spec=load_data("mnist5k").spec,
        seed=1,
        init="signed_constant",
        scale_fan=False,
        k=0.5,
        provenance={"data": "mnist5k"},
    )
    path = save_artifact(artifact, tmp_path / "fc.safetensors")
    proc = _run(
        "deploy.py",
        "--workload",
        "conv4",
        "--artifact",
        f"conv4={path}",
        "--workdir",
        str(tmp_path),
        "--rounds",
        "2",
        "--runs",
        "2",
        "--starts",
        "1",
        "--threads",
        "1",
        "--json",
    )
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    assert sorted((r["storage"], r["precision"]) for r in rows) == sorted(
        (s, p) for s in ("dense", "compact", "regen") for p in ("fp32", "int8")
    )
    for r in rows:
        assert r["workload"] == "conv4"
        for key in (
            "bits_per_weight",
            "session_start_ms",
            "throughput_b1",
            "throughput_b64",
            "peak_rss_mb",
            "session_start_vs_compact_fp32",
            "p99_ms_b64",
        ):
            assert isinstance(r[key], float) and math.isfinite(r[key]) and r[key] > 0, key
        assert 0.0 <= r["top1"] <= 1.0 and 0.0 <= r["argmax_agreement"] <= 1.0
        assert r["bits_per_weight"] == 8 * r["file_bytes"] / artifact.masked_weights
        assert r["int8_weight_max_error"] == (0.0 if r["precision"] == "int8" else None)
    baseline = next(r for r in rows if (r["storage"], r["precision"]) == ("dense", "fp32"))
    assert baseline["argmax_agreement"] == 1.0 and baseline["speedup_b1"] == 1.0
    # the fp32 storages compute the same network: the same held-out top-1
    assert len({r["top1"] for r in rows if r["precision"] == "fp32"}) == 1


def test_search_step_breakdown_variants_and_recipe_flags(capsys):
    """The breakdown variants (no selection; no backward arithmetic either) and the accelerator-recipe
    flags on the CPU: every requested variant is timed and the record says which recipe ran."""
    script = _load_script("search_step")
    argv = [
        "--arch",
        "fc",
        "--batch",
        "4",
        "--repeats",
        "1",
        "--inner",
        "1",
        "--warmup",
        "0",
        "--no-memory",
        "--json",
        "--variants",
        "search,dense,fixed-mask,fixed-all",
        "--masker",
        "torch",
        "--precision",
        "bf16",
    ]
    assert script.main(argv) == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in ("search_ms", "dense_ms", "fixed_mask_ms", "fixed_all_ms"):
        assert isinstance(record[key], float) and record[key] > 0, key
    assert record["reference_ms"] is None and record["reference_ratio"] is None
    assert (record["masker"], record["precision"], record["channels_last"], record["compile"]) == (
        "torch",
        "bf16",
        False,
        None,
    )
    assert record["variants"] == ["search", "dense", "fixed-mask", "fixed-all"]

"""benchmarks/gpu_check.sh: refuses without CUDA, and its CPU smoke mode runs the very parts a GPU run
does (tiny sizes) and writes results.json and summary.md. Time limits and the report are checked on
made-up parts."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"


def _load():
    spec = importlib.util.spec_from_file_location("_bench_gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _check(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env={**os.environ, "PYTHON": sys.executable},
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU machine runs the real check")
def test_without_cuda_it_stops_at_once_with_one_line(tmp_path, capsys):
    assert _load().main(["--out", str(tmp_path / "check")]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1
    assert captured.err.startswith("error: no CUDA device here") and "--smoke" in captured.err
    assert not (tmp_path / "check").exists()


def _smoke(tmp_path, parts: str, *, in_process: bool = False, capsys=None) -> dict:
    """Run the smoke check (through the shell script, or in this process to save an interpreter)."""
    out = tmp_path / "smoke"
    argv = ["--smoke", "--parts", parts, "--out", str(out)]
    if in_process:
        code, output = _load().main(argv), capsys.readouterr().out
    else:
        done = _check(*argv)
        code, output = done.returncode, done.stdout[-3000:] + done.stderr[-3000:]
    assert code == 0, output
    results = json.loads((out / "results.json").read_text())
    assert [p["name"] for p in results["parts"]] == parts.split(",")
    assert all(p["status"] == "ok" for p in results["parts"]), results["parts"]
    assert (out / "summary.md").read_text() in output  # printed at the end, too
    results["_markdown"] = (out / "summary.md").read_text()
    results["_out"] = out
    return results


def test_smoke_search_step(tmp_path, capsys):
    results = _smoke(tmp_path, "search-step", in_process=True, capsys=capsys)
    (part,) = results["parts"]
    (step,) = part["records"]
    assert step["arch"] == "fc" and step["device"] == "cpu" and step["batch"] == 8
    assert step["ratio"] == pytest.approx(step["search_ms"] / step["dense_ms"], rel=1e-9)
    assert step["reference_ratio"] == pytest.approx(step["reference_ms"] / step["search_ms"], rel=1e-9)
    assert f"| eager | fc | 1×28×28 | 8 | fp32 | numpy | {step['search_ms']:,.2f} |" in results["_markdown"]
    targets = {t["target"]: t for t in results["targets"]}
    assert targets["fc search / dense step <= 1.1"]["value"] == step["ratio"]
    assert (results["_out"] / "search-step.log").read_text().strip()
    assert results["machine"]["gpus"] == [] and results["mode"] == "smoke (CPU)"


@pytest.mark.slow
def test_smoke_runs_every_part(tmp_path):
    results = _smoke(tmp_path, "cuda-tests,search-step,epoch-like,torchrun,search-step-compile")
    parts = {p["name"]: p for p in results["parts"]}
    junit = parts["cuda-tests"]["junit"]
    assert junit["tests"] > 0 and junit["tests"] == junit["skipped"]  # no CUDA here: all skip cleanly
    (epoch,) = parts["epoch-like"]["records"]
    assert epoch["mode"] == "epoch-like" and epoch["train_images"] == 20 and epoch["images_per_s_last_epoch"] > 0
    assert "| fc | 10 | 8 | 0 |" in results["_markdown"]
    (compiled,) = parts["search-step-compile"]["records"]
    assert compiled["compile"] == "aot_eager" and compiled["reference_ms"] is None
    assert "| compiled (aot_eager) | fc |" in results["_markdown"]
    assert (results["_out"] / "torchrun-run" / "artifact.safetensors").is_file()
    # the torchrun search ran the accelerator recipe (on the CPU here), and its artifact says so
    from maskforge.artifact import load_artifact

    provenance = load_artifact(results["_out"] / "torchrun-run" / "artifact.safetensors").document["provenance"]
    # fc has no convolution, so channels_last resolves to False
    assert (provenance["precision"], provenance["channels_last"], provenance["masker"]) == ("bf16", False, "torch")


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "State:\tZ" not in state  # a zombie waiting for its reaper has stopped


def test_a_part_past_its_limit_is_stopped_with_its_children_and_keeps_its_output(tmp_path):
    gpu_check = _load()
    pid_file = tmp_path / "grandchild.pid"
    # a shell (fast to start, even on a loaded machine) with a child of its own, printing one record
    script = f'sleep 300 & echo $! > {pid_file}; echo \'{{"arch": "x", "ratio": 1.5}}\'; sleep 300'
    part = gpu_check.Part("slow-part", ["sh", "-c", script], limit_s=3, about="sleeps")
    record = gpu_check.run_part(part, tmp_path, deadline=gpu_check.time.monotonic() + 100)
    assert record["status"] == "timeout" and record["returncode"] is None
    assert record["records"] == [{"arch": "x", "ratio": 1.5}]
    assert record["seconds"] < 30
    grandchild = int(pid_file.read_text())
    for _ in range(100):  # the signal is delivered at once, the exit may take a moment
        if not _alive(grandchild):
            break
        gpu_check.time.sleep(0.05)
    assert not _alive(grandchild)  # the whole process group went
    spent = gpu_check.run_part(part, tmp_path, deadline=gpu_check.time.monotonic() + 1)
    assert spent["status"] == "skipped" and spent["note"] == "the time budget was spent"


def test_report_of_real_search_step_records_names_failures_and_targets():
    gpu_check = _load()
    spec = importlib.util.spec_from_file_location("_bench_search_step", ROOT / "benchmarks" / "search_step.py")
    search_step = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = search_step
    spec.loader.exec_module(search_step)
    step = search_step.run_workload(
        search_step.WORKLOADS["fc"],
        torch.device("cpu"),
        repeats=1,
        inner=1,
        batch=4,
        memory=False,
        threads=None,
        warmup=0,
        variants=("search", "dense"),
    )
    step.update(arch="wrn50", ratio=1.05, reference_ratio=1.1, peak_ratio=1.2)
    parts = {
        "search-step": {"name": "search-step", "records": [step]},
        "cuda-tests": {"junit": {"tests": 9, "failures": 1, "errors": 0, "skipped": 2}},
        "epoch-like": {"records": [{"images_per_s_last_epoch": 1234.0}]},
    }
    targets = gpu_check.evaluate_targets(parts, arch="wrn50")
    assert [t["met"] for t in targets] == [True, False, False, False, None]
    assert targets[0]["target"] == "wrn50 search / dense step <= 1.1" and targets[4]["value"] == 1234.0
    failed = {
        "name": "torchrun",
        "status": "failed",
        "seconds": 3.0,
        "limit_s": 45.0,
        "about": "a",
        "log": "torchrun.log",
        "tail": "line one\nTraceback: boom\n",
        "note": "artifact: bad",
    }
    results = {
        "mode": "gpu",
        "budget_s": 470,
        "seconds": 12.0,
        "targets": targets,
        "machine": {
            "date": "d",
            "gpus": ["H200"],
            "driver": "1",
            "torch": "t",
            "cuda": "c",
            "maskforge": "m",
            "commit": "abc",
            "cpus": 16,
        },
        "parts": [
            {
                **parts["search-step"],
                "status": "ok",
                "seconds": 5.0,
                "limit_s": 130.0,
                "about": "b",
                "log": "search-step.log",
            },
            failed,
        ],
    }
    text = gpu_check.markdown(results)
    assert (
        f"| eager | wrn50 | 1×28×28 | 4 | fp32 | numpy | {step['search_ms']:,.2f} | {step['dense_ms']:,.2f} "
        f"| **1.050** | — | 1.10 | — / — | 1.200 |"
    ) in text
    assert "| torchrun | failed (artifact: bad) | 3 | 45 | a |" in text
    assert "### torchrun: failed (last lines of torchrun.log)" in text and "Traceback: boom" in text
    assert "| wrn50 search / dense step <= 1.1 | 1.050 | ✔ |" in text
    assert "| every CUDA test passes | tests 9, failures 1, errors 0, skipped 2 | ✘ |" in text

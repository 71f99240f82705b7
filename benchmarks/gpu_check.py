#!/usr/bin/env python
"""The one-command GPU check: every CUDA path of maskforge, measured, in under 8 minutes.

On a machine with CUDA it runs, one after the other, each part under its own time limit:

1. `cuda-tests`          pytest -m cuda (the CUDA tests of every test file), JUnit XML kept;
2. `search-step`         benchmarks/search_step.py --device cuda for conv4 and resnet18 (32 px, batch 128)
                         and wrn50 (224 px, batch 256 or the largest that fits), bf16 autocast, eager,
                         with peak memory per variant;
3. `epoch-like`          a real search (resnet18, 224 px) over JPEG files it writes, images/s per epoch;
4. `torchrun`            `maskforge search` under torchrun on every visible GPU (NCCL), artifact checked;
5. `search-step-compile` the search-step workloads again under torch.compile (search and dense only).

It writes into one folder (default gpu-check-<date>): results.json (everything), summary.md (tables and
the targets of issue 11, met or missed), and one log per part. Without CUDA it stops at once with one
line. `--smoke` runs the same parts with tiny sizes on the CPU (what the test suite drives).

    benchmarks/gpu_check.sh                      # on a GPU machine
    benchmarks/gpu_check.sh --out /tmp/check --budget 470
    benchmarks/gpu_check.sh --smoke --out /tmp/smoke   # CPU dry run of the script itself
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_BUDGET_S = 470  # under 8 minutes with the start-up and the summary
SMOKE_BUDGET_S = 600  # a loaded CPU machine; the smoke parts take seconds each when idle
PARTS = ("cuda-tests", "search-step", "epoch-like", "torchrun", "search-step-compile")
# The accelerator recipe, spelled out for the torchrun search (on CUDA these are also the defaults; the smoke
# run passes them on the CPU, where they select the same code path).
RECIPE_FLAGS = ["--precision", "bf16", "--channels-last", "--masker", "torch"]


@dataclass
class Part:
    name: str
    argv: list[str]
    limit_s: float
    about: str


def _search_step(*args: str) -> list[str]:
    return [sys.executable, str(ROOT / "benchmarks" / "search_step.py"), "--json", *args]


def plan(out: Path, *, smoke: bool, gpus: int) -> list[Part]:
    """The parts, in order. Smoke: the same commands on the CPU with tiny sizes."""
    device = "cpu" if smoke else "cuda"
    tests = [
        sys.executable,
        "-m",
        "pytest",
        "-m",
        "cuda and not slow",
        "-q",
        "-rfEs",
        "--durations=15",
        "-p",
        "no:cacheprovider",
        f"--junitxml={out / 'cuda-tests.xml'}",
    ]
    if smoke:
        tests.append(str(ROOT / "tests" / "test_gpu.py"))
        sizes = ["--batch", "8", "--repeats", "2", "--inner", "1", "--warmup", "1", "--no-memory"]
        eager_archs = compile_archs = ["--arch", "fc"]
        compile_args = ["--compile-backend", "aot_eager"]  # the dry run needs no C++ toolchain
        epoch = [
            "--_epoch-like-on-cpu",
            "--arch",
            "fc",
            "--epoch-images",
            "20",
            "--epoch-image-size",
            "8",
            "--epoch-workers",
            "0",
            "--epoch-batch",
            "10",
            "--epochs",
            "1",
        ]
        run = ["--arch", "fc", "--max-steps", "2", "--epochs", "1", "--batch-size", "16"]
        limits = dict.fromkeys(PARTS, 150.0)
    else:
        sizes, compile_args = [], []
        eager_archs = ["--arch", "conv4", "--arch", "resnet18", "--arch", "wrn50"]
        compile_archs = ["--arch", "conv4", "--arch", "wrn50", "--arch", "resnet18"]  # wrn50 before resnet18
        epoch = [
            "--arch",
            "resnet18",
            "--epoch-images",
            "2560",
            "--epoch-image-size",
            "224",
            "--epoch-workers",
            str(max(1, min(8, (os.cpu_count() or 2) - 1))),
            "--epochs",
            "2",
        ]
        run = ["--arch", "conv4", "--max-steps", "40", "--epochs", "2", "--batch-size", str(64 * gpus)]
        limits = {
            "cuda-tests": 150.0,
            "search-step": 130.0,
            "epoch-like": 55.0,
            "torchrun": 45.0,
            "search-step-compile": 80.0,
        }
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        str(gpus),
        "-m",
        "maskforge.cli",
        "search",
        *run,
        "--device",
        device,
        "-q",
        "--out",
        str(out / "torchrun-run"),
        "--overwrite",
        *RECIPE_FLAGS,
    ]  # a rerun into the same --out
    return [
        Part("cuda-tests", tests, limits["cuda-tests"], "pytest -m cuda"),
        Part(
            "search-step",
            _search_step("--device", device, *sizes, *eager_archs),
            limits["search-step"],
            "search vs dense vs sort-based reference step, eager, peak memory",
        ),
        Part(
            "epoch-like",
            _search_step("--device", device, "--epoch-like", *epoch),
            limits["epoch-like"],
            "a real search over image files it writes: images/s",
        ),
        Part("torchrun", torchrun, limits["torchrun"], f"maskforge search under torchrun, {gpus} process(es)"),
        Part(
            "search-step-compile",
            _search_step(
                "--device",
                device,
                *sizes,
                "--compile",
                *compile_args,
                "--variants",
                "search,dense",
                "--no-memory",
                *compile_archs,
            ),
            limits["search-step-compile"],
            "search vs dense step under torch.compile",
        ),
    ]


# --- running a part ---------------------------------------------------------------------------------------


def run_part(part: Part, out: Path, deadline: float) -> dict:
    """Run one part under min(its limit, the time left); its output goes to OUT/<name>.log."""
    limit = min(part.limit_s, deadline - time.monotonic())
    record = {
        "name": part.name,
        "about": part.about,
        "command": part.argv,
        "limit_s": round(limit, 1),
        "log": f"{part.name}.log",
    }
    if limit < min(5.0, part.limit_s):
        return {**record, "status": "skipped", "note": "the time budget was spent", "seconds": 0.0}
    log_path = out / record["log"]
    # cuBLAS is deterministic (tests with deterministic=True) only with a fixed workspace, read when the
    # process creates its first handle: set before any test runs.
    env = {"CUBLAS_WORKSPACE_CONFIG": ":4096:8", **os.environ, "PYTHONUNBUFFERED": "1"}
    started = time.monotonic()
    with open(log_path, "w") as log:
        # A session of its own, so a timeout stops the whole tree (torchrun's workers, loader processes).
        proc = subprocess.Popen(
            part.argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        try:
            code = proc.wait(timeout=limit)
            status = "ok" if code == 0 else "failed"
        except subprocess.TimeoutExpired:
            code, status = None, "timeout"
        _stop(proc)  # also whatever the part left running in its session
    text = log_path.read_text(errors="replace")
    record.update(
        status=status,
        returncode=code,
        seconds=round(time.monotonic() - started, 1),
        records=[json.loads(line) for line in text.splitlines() if _is_json_object(line)],
        tail=text[-2000:],
    )
    return record


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL, to the part's whole process group (its session), if anything is left."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            continue
        time.sleep(0.2)  # let the rest of the group act on the signal before checking again


def _is_json_object(line: str) -> bool:
    if not line.startswith("{"):
        return False
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:
        return False


def junit_counts(path: Path) -> dict | None:
    """tests/failures/errors/skipped of a pytest JUnit XML file (None if it is missing or unreadable)."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    return {key: sum(int(s.get(key, 0)) for s in suites) for key in ("tests", "failures", "errors", "skipped")}


def check_torchrun_artifact(run_dir: Path, processes: int) -> str | None:
    """None if the torchrun run wrote a valid artifact made by `processes` processes, else the problem."""
    from maskforge.artifact import load_artifact
    from maskforge.errors import MaskforgeError

    try:
        artifact = load_artifact(run_dir / "artifact.safetensors")
    except (MaskforgeError, OSError) as exc:
        return f"artifact: {exc}"
    found = artifact.document["provenance"].get("processes")
    return None if found == processes else f"artifact made by {found} processes, expected {processes}"


# --- the verdict ------------------------------------------------------------------------------------------


def evaluate_targets(parts: dict[str, dict], *, arch: str) -> list[dict]:
    """Issue 11's GPU targets, from the eager search-step record of `arch` and the other parts."""
    step = next((r for r in parts.get("search-step", {}).get("records", []) if r.get("arch") == arch), {})
    checks = [
        ("search / dense step", step.get("ratio"), "<=", 1.10),
        ("reference / search step (sort-based masker is slower)", step.get("reference_ratio"), ">=", 1.2),
        ("peak memory search / dense", step.get("peak_ratio"), "<=", 1.15),
    ]
    targets = []
    for what, value, op, bound in checks:
        met = None if value is None else (value <= bound if op == "<=" else value >= bound)
        targets.append({"target": f"{arch} {what} {op} {bound}", "value": value, "met": met})
    counts = parts.get("cuda-tests", {}).get("junit")
    passing = (
        None if counts is None else (counts["tests"] > counts["skipped"] and counts["failures"] + counts["errors"] == 0)
    )
    targets.append({"target": "every CUDA test passes", "value": counts, "met": passing})
    epoch = next(iter(parts.get("epoch-like", {}).get("records", [])), {})
    targets.append(
        {"target": "epoch-like images/s (reported)", "value": epoch.get("images_per_s_last_epoch"), "met": None}
    )
    return targets


# --- the report -------------------------------------------------------------------------------------------


def machine(smoke: bool) -> dict:
    import torch

    import maskforge

    info = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "maskforge": maskforge.__version__,
        "cpus": os.cpu_count(),
        "host_cpu": platform.processor() or platform.machine(),
        "gpus": [] if smoke else [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
    }
    for key, command in (
        ("driver", ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]),
        ("commit", ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"]),
    ):
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=20)
            lines = done.stdout.strip().splitlines() if done.returncode == 0 else []
            info[key] = lines[0] if lines else None
        except (OSError, subprocess.TimeoutExpired):
            info[key] = None
    return info


def _fmt(value, digits: int = 2) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


def markdown(results: dict) -> str:
    m = results["machine"]
    gpus = ", ".join(m["gpus"]) or "none (CPU smoke run)"
    lines = [
        f"# maskforge GPU check — {m['date']} ({results['mode']})",
        "",
        f"GPU: {gpus}; driver {_fmt(m.get('driver'))}; torch {m['torch']} (CUDA {_fmt(m['cuda'])}); "
        f"maskforge {m['maskforge']} ({_fmt(m.get('commit'))}); {m['cpus']} CPUs. "
        f"Wall time {results['seconds']:.0f} s of a {results['budget_s']:.0f} s budget.",
        "",
        *(
            ["**Smoke run**: tiny sizes on the CPU to check the script; its figures and targets mean nothing.", ""]
            if results["mode"] != "gpu"
            else []
        ),
        "## Parts",
        "",
        "| part | status | seconds | limit (s) | what |",
        "|---|---|---:|---:|---|",
    ]
    for part in results["parts"]:
        status = part["status"] + (f" ({part['note']})" if part.get("note") else "")
        lines.append(f"| {part['name']} | {status} | {part['seconds']:.0f} | {part['limit_s']:.0f} | {part['about']} |")
    lines += [
        "",
        "## Search step (medians, ms per step)",
        "",
        "| mode | arch | input | batch | precision | masker | search | dense | **search/dense** | reference "
        "| reference/search | peak MB search / dense | peak ratio |",
        "|---|---|---|---:|---|---|---:|---:|---:|---:|---:|---|---:|",
    ]
    for part in results["parts"]:
        if part["name"].startswith("search-step"):
            for r in part.get("records", []):
                mode = f"compiled ({r['compile']})" if r.get("compile") else "eager"
                size = "×".join(map(str, r["input"]))
                lines.append(
                    f"| {mode} | {r['arch']} | {size} | {r['batch']} | {r['precision']} | {r['masker']} | "
                    f"{_fmt(r['search_ms'])} | {_fmt(r['dense_ms'])} | **{_fmt(r['ratio'], 3)}** | "
                    f"{_fmt(r['reference_ms'])} | {_fmt(r['reference_ratio'])} | "
                    f"{_fmt(r['search_peak_mb'], 0)} / {_fmt(r['dense_peak_mb'], 0)} | "
                    f"{_fmt(r['peak_ratio'], 3)} |"
                )
    lines += [
        "",
        "## Epoch-like search over image files",
        "",
        "| arch | batch | px | loader processes | images/s by epoch | wall s |",
        "|---|---:|---:|---:|---|---:|",
    ]
    for r in next((p for p in results["parts"] if p["name"] == "epoch-like"), {}).get("records", []):
        by_epoch = ", ".join(f"{v:,.0f}" for v in r["images_per_s_by_epoch"])
        lines.append(
            f"| {r['arch']} | {r['batch']} | {r['image_size']} | {r['workers']} | {by_epoch} | {r['wall_s']:.1f} |"
        )
    lines += ["", "## Targets (issue 11)", "", "| target | value | met |", "|---|---|---|"]
    for t in results["targets"]:
        met = {True: "✔", False: "✘", None: "—"}[t["met"]]
        value = t["value"]
        value = ", ".join(f"{k} {v}" for k, v in value.items()) if isinstance(value, dict) else _fmt(value, 3)
        lines.append(f"| {t['target']} | {value} | {met} |")
    failed = [p for p in results["parts"] if p["status"] not in ("ok", "skipped")]
    for part in failed:
        lines += [
            "",
            f"### {part['name']}: {part['status']} (last lines of {part['log']})",
            "",
            "```",
            *part.get("tail", "").splitlines()[-25:],
            "```",
        ]
    return "\n".join(lines) + "\n"


def write_results(out: Path, results: dict) -> None:
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "summary.md").write_text(markdown(results))


# --- command line -----------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__
    )
    parser.add_argument(
        "--out",
        type=Path,
        help="folder for results.json, summary.md and the logs (default: gpu-check-<UTC date and time>)",
    )
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU: checks the script itself")
    parser.add_argument(
        "--budget", type=float, help=f"seconds for all parts (default {DEFAULT_BUDGET_S}; smoke {SMOKE_BUDGET_S})"
    )
    parser.add_argument(
        "--parts", default=",".join(PARTS), help=f"comma list of parts (default: all of {','.join(PARTS)})"
    )
    args = parser.parse_args(argv)
    chosen = args.parts.split(",")
    if set(chosen) - set(PARTS):
        parser.error(f"--parts: choose from {', '.join(PARTS)}")
    import torch

    if not args.smoke and not torch.cuda.is_available():
        print(
            f"error: no CUDA device here (torch {torch.__version__}: torch.cuda.is_available() is False); "
            "run the GPU check on a GPU machine, or --smoke for the CPU dry run",
            file=sys.stderr,
        )
        return 2
    started = time.monotonic()
    budget = args.budget or (SMOKE_BUDGET_S if args.smoke else DEFAULT_BUDGET_S)
    out = args.out or ROOT / f"gpu-check-{dt.datetime.now(dt.timezone.utc):%Y%m%d-%H%M%S}"
    out.mkdir(parents=True, exist_ok=True)
    gpus = 1 if args.smoke else torch.cuda.device_count()
    results = {
        "mode": "smoke (CPU)" if args.smoke else "gpu",
        "budget_s": budget,
        "seconds": 0.0,
        "machine": machine(args.smoke),
        "parts": [],
        "targets": [],
    }
    deadline = started + budget
    for part in plan(out, smoke=args.smoke, gpus=gpus):
        if part.name not in chosen:
            continue
        print(
            f"[{time.monotonic() - started:5.0f} s] {part.name}: {part.about} (limit {part.limit_s:.0f} s)", flush=True
        )
        record = run_part(part, out, deadline)
        if part.name == "cuda-tests":
            record["junit"] = junit_counts(out / "cuda-tests.xml")
        if part.name == "torchrun" and record["status"] == "ok":
            problem = check_torchrun_artifact(out / "torchrun-run", gpus)
            if problem:
                record.update(status="failed", note=problem)
        results["parts"].append(record)
        results["seconds"] = time.monotonic() - started
        write_results(out, results)  # after every part: a crash or kill later keeps what was measured
    parts = {p["name"]: p for p in results["parts"]}
    results["targets"] = evaluate_targets(parts, arch="fc" if args.smoke else "wrn50")
    results["seconds"] = time.monotonic() - started
    write_results(out, results)
    print((out / "summary.md").read_text())
    print(f"wrote {out / 'results.json'} and {out / 'summary.md'}")
    return 0 if all(p["status"] == "ok" for p in results["parts"]) else 1


if __name__ == "__main__":
    sys.exit(main())

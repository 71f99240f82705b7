"""torchrun on CPU (gloo): two processes give one valid artifact, the same masks on both ranks, the same
examples at every step as one process (the short last global batch included, even when it leaves a rank
nothing), and the accuracy of a one-process search with the same (global) batch; only rank 0 writes to the
run folder.

The oracles are a one-process search of the same arguments (run here, through a spied architecture that
records what it trains on) and what each rank reports through the value `search` returns on every rank
(`SearchResult.mask_digest`, its artifact's BN statistics), recomputed here from the saved artifact. The
ranks report through a launcher script (below) that wraps the library's `search`/`resume` and then runs
the normal CLI: the library itself has no test hooks.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path

import pytest
import torch

from helpers import spy_arch, write_image_folder, write_mnist_folder
from maskforge.artifact import load_artifact, pack_mask
from maskforge.checkpoint import CHECKPOINT_NAME, load_checkpoint, read_position
from maskforge.distributed import World, detect
from maskforge.errors import MaskforgeError
from maskforge.searches import TIMING_FIELDS, SearchConfig, search

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="torch.distributed with gloo is not available",
)

RUN_FILES = ["artifact.safetensors", "checkpoint.safetensors", "config.json", "metrics.csv", "metrics.jsonl"]

# Registers two test-only architectures (fc that records its training inputs, and a tiny conv + BN net),
# makes `search`/`resume` write what each rank returned to SPY_DIR/rank<r>.json, then runs the normal CLI.
# With FAULTS (JSON: {"<restart count>": {"rank": r, "at": n, "signal": "SIGTERM"|"SIGKILL"}}), the rank
# sends itself the signal at its n-th training forward of that torchrun attempt; a search stopped by a
# signal reports its step to SPY_DIR/attempt<a>-rank<r>.json.
_LAUNCHER = textwrap.dedent("""
    import hashlib, importlib, json, os, signal, sys
    import torch.nn as nn
    from maskforge import archs
    from maskforge.layers import MaskedConv2d, MaskedLinear, NonAffineBatchNorm2d

    trained = []  # per optimizer step: SHA-256 of every input row this rank trained on
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    fault = json.loads(os.environ.get("FAULTS", "{}")).get(attempt)

    def record(module, args):
        if module.training:
            trained.append([hashlib.sha256(row.numpy().tobytes()).hexdigest() for row in args[0].flatten(1)])
            if fault and fault["rank"] == int(os.environ["RANK"]) and len(trained) == fault["at"]:
                os.kill(os.getpid(), getattr(signal, fault["signal"]))

    @archs.register_arch("_spy_fc", "test-only fc recording its inputs")
    def spy_fc(*args, **kwargs):
        model = archs.ARCHS["fc"].builder(*args, **kwargs)
        model.register_forward_pre_hook(record)
        return model

    @archs.register_arch("_test_bn", "test-only conv + BN")
    def tiny_bn(in_channels, num_classes, image_size, k=0.5):
        return nn.Sequential(MaskedConv2d(in_channels, 8, 3, padding=1, k=k), NonAffineBatchNorm2d(8),
                             nn.ReLU(), nn.AvgPool2d(2), nn.Flatten(),
                             MaskedLinear(8 * (image_size[0] // 2) * (image_size[1] // 2), num_classes, k=k))

    library = importlib.import_module("maskforge.searches")

    def reporting(function):
        def run(*args, **kwargs):
            try:
                result = function(*args, **kwargs)
            except library.SearchInterrupted as stopped:
                with open(os.path.join(os.environ["SPY_DIR"], f"attempt{attempt}-rank{os.environ['RANK']}.json"),
                          "w") as handle:
                    json.dump({"signal": stopped.signal_name, "step": stopped.checkpoint_step}, handle)
                raise
            report = {"mask_digest": result.mask_digest, "trained": trained,
                      "bn": {name: stat.tolist() for name, stat in result.artifact.bn_stats.items()}}
            with open(os.path.join(os.environ["SPY_DIR"], f"rank{os.environ['RANK']}.json"), "w") as handle:
                json.dump(report, handle)
            return result
        return run

    library.search, library.resume = reporting(library.search), reporting(library.resume)
    from maskforge.cli import main
    sys.argv = ["maskforge"] + sys.argv[1:]
    main()
""")


def _torchrun(*args: str, nproc: int = 2) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), *args]


def _env(spy_dir=None) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    env.pop("WORLD_SIZE", None)
    if spy_dir is not None:
        env["SPY_DIR"] = str(spy_dir)
    return env


def _launcher(tmp_path) -> str:
    path = tmp_path / "launcher.py"
    path.write_text(_LAUNCHER)
    return str(path)


def _kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants (torchrun starts its workers in sessions of their own, so
    killing torchrun's process group leaves them running)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    stack, victims = [pid], []
    while stack:
        victims.append(stack.pop())
        stack.extend(children.get(victims[-1], []))
    for victim in victims:
        try:
            os.kill(victim, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _reports(folder) -> list[dict]:
    return [json.loads((folder / f"rank{rank}.json").read_text()) for rank in (0, 1)]


def _mask_digest(artifact) -> str:
    """What each rank reports, recomputed from the saved artifact: layer name + packed mask bytes."""
    digest = hashlib.sha256()
    for param, mask in artifact.masks.items():
        digest.update(param.rsplit(".", 1)[0].encode("utf-8"))
        digest.update(pack_mask(mask).tobytes())
    return digest.hexdigest()


def test_detect_reads_torchrun_variables():
    assert detect({}) == World()
    world = detect({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"})
    assert (world.rank, world.world_size, world.local_rank, world.local_world_size) == (3, 4, 1, 2)
    assert world.is_distributed and not world.is_main
    with pytest.raises(MaskforgeError, match="^environment variable WORLD_SIZE='two' is not an integer"):
        detect({"WORLD_SIZE": "two"})
    with pytest.raises(MaskforgeError, match="^inconsistent torchrun environment: RANK=2 WORLD_SIZE=2"):
        detect({"WORLD_SIZE": "2", "RANK": "2"})


# 1,001 training images at a global batch of 200: 5 full steps and a last one of a single image, which
# rank 0 takes while rank 1 steps with an empty batch; two epochs.
DDP_ARGS = [
    "--arch",
    "_spy_fc",
    "--k",
    "0.5",
    "--epochs",
    "2",
    "--batch-size",
    "200",
    "--device",
    "cpu",
    "--keep-checkpoint",
    "-q",
]


class DdpRun:
    """The 2-process search of DDP_ARGS, started once per module and awaited where needed."""

    def __init__(self, root) -> None:
        self.root, self.out, self.spies = root, root / "ddp", root / "spies"
        self.spies.mkdir()
        self.data = str(write_mnist_folder(root / "data", 1001, 500))
        self.launcher = _launcher(root)
        self.proc = subprocess.Popen(
            _torchrun(self.launcher, "search", *DDP_ARGS, "--data", self.data, "--out", str(self.out)),
            env=_env(self.spies),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        self._output = None

    def wait(self) -> tuple[str, str]:
        if self._output is None:
            self._output = self.proc.communicate(timeout=300)
            assert self.proc.returncode == 0, self._output[1][-3000:]
        return self._output


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    run = DdpRun(tmp_path_factory.mktemp("ddp"))
    yield run
    if run.proc.poll() is None:
        _kill_tree(run.proc.pid)  # torchrun and its workers
        run.proc.wait()


def test_torchrun_two_processes_on_cpu(tmp_path, ddp_run):
    data, out, spies = ddp_run.data, ddp_run.out, ddp_run.spies
    # Meanwhile, the same search in one process (this one): the oracle.
    with spy_arch("fc") as spy:  # registers "_spy_fc" here too, so its artifacts load
        single = search(
            SearchConfig(
                arch=spy.name, k=0.5, data=data, epochs=2, batch_size=200, device="cpu", out=str(tmp_path / "single")
            )
        )
        stdout, stderr = ddp_run.wait()
        artifact = load_artifact(out / "artifact.safetensors")  # fully validated

    # Rank 0 alone wrote files, and reported once.
    assert sorted(p.name for p in out.iterdir()) == RUN_FILES
    assert stdout.count("done:") == 1
    assert (artifact.document["provenance"]["processes"], artifact.document["provenance"]["batch_size"]) == (2, 200)
    reports = _reports(spies)
    assert [report["mask_digest"] for report in reports] == [_mask_digest(artifact)] * 2

    # Step s of the two processes trained on exactly the examples of step s of one process.
    single_steps = [
        Counter(hashlib.sha256(row.numpy().tobytes()).hexdigest() for row in x.flatten(1)) for x in spy.trained
    ]
    assert [len(step) for step in reports[0]["trained"]] == ([100] * 5 + [1]) * 2
    assert [len(step) for step in reports[1]["trained"]] == ([100] * 5 + [0]) * 2
    assert len(single_steps) == 12
    for step, expected in enumerate(single_steps):
        assert Counter(reports[0]["trained"][step]) + Counter(reports[1]["trained"][step]) == expected, step

    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [6, 12]
    # Same examples and the same mean-loss gradient per step: the runs differ only by float summation order.
    assert abs(metrics[-1]["heldout_acc"] - single.heldout_acc) <= 0.03
    assert abs(metrics[-1]["train_loss"] - single.metrics[-1]["train_loss"]) <= 0.01
    same_bits = sum(int((artifact.masks[p] == m).sum()) for p, m in single.artifact.masks.items())
    assert same_bits / artifact.masked_weights > 0.99
    ckpt = load_checkpoint(out / CHECKPOINT_NAME)
    assert ckpt.meta.world_size == 2 and len(ckpt.meta.train_sums) == 2


def test_elastic_restarts_after_sigterm_on_one_rank_and_a_killed_worker(tmp_path, ddp_run):
    """torchrun --max-restarts reruns the same command line: it continues the unfinished search. Attempt 0:
    rank 1 alone gets SIGTERM at its step 3; both ranks agree to stop at the same step (the next one),
    checkpoint together and exit 143. Attempt 1: rank 1 is SIGKILLed mid-epoch (step 8 of 12; the last
    checkpoint is step 6 or 8). Attempt 2 finishes: the artifact is the uninterrupted 2-process run's, byte
    for byte, and so are the metrics."""
    spies = tmp_path / "spies"
    spies.mkdir()
    faults = {"0": {"rank": 1, "at": 3, "signal": "SIGTERM"}, "1": {"rank": 1, "at": 4, "signal": "SIGKILL"}}
    out = tmp_path / "elastic"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "--max-restarts",
        "2",
        ddp_run.launcher,
        "search",
        *DDP_ARGS,
        "--data",
        ddp_run.data,
        "--checkpoint-every",
        "2",
        "--out",
        str(out),
    ]
    proc = subprocess.Popen(
        command,
        env={**_env(spies), "FAULTS": json.dumps(faults)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        _, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            _kill_tree(proc.pid)  # torchrun and its workers
            proc.wait()
    assert proc.returncode == 0, stderr[-3000:]
    # attempt 0: the same step on both ranks, one after the signal (the agreement is read one poll later)
    assert [json.loads((spies / f"attempt0-rank{rank}.json").read_text()) for rank in (0, 1)] == [
        {"signal": "SIGTERM", "step": 4}
    ] * 2
    assert not list(spies.glob("attempt1-*"))  # SIGKILL: no goodbye
    ddp_run.wait()
    assert (out / "artifact.safetensors").read_bytes() == (ddp_run.out / "artifact.safetensors").read_bytes()

    def metrics(folder):
        return [
            {k: v for k, v in json.loads(line).items() if k not in TIMING_FIELDS}
            for line in (folder / "metrics.jsonl").read_text().splitlines()
        ]

    assert metrics(out) == metrics(ddp_run.out)


# ---------------------------------------------------------------------------------------------------------
# slow: batch norm + augmentation under torchrun, an empty share, killed and resumed
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_torchrun_batchnorm_kill_and_resume_is_exact(tmp_path):
    launcher = _launcher(tmp_path)
    data = write_image_folder(tmp_path / "images", 64)
    extra = sorted((data / "train" / "dark").iterdir())[0]
    (data / "train" / "dark" / "extra.png").write_bytes(extra.read_bytes())  # 129 images: a last batch of 1
    args = [
        "search",
        "--arch",
        "_test_bn",
        "--k",
        "0.4",
        "--data",
        str(data),
        "--epochs",
        "3",
        "--batch-size",
        "16",
        "--workers",
        "0",
        "--device",
        "cpu",
        "-q",
    ]
    reference, killed, spies = tmp_path / "reference", tmp_path / "killed", tmp_path / "spies"
    spies.mkdir()
    done = subprocess.run(
        _torchrun(launcher, *args, "--out", str(reference)),
        env=_env(spies),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    # Batch-norm statistics and masks agree on both ranks.
    reports = _reports(spies)
    assert reports[0]["bn"] and reports[0]["bn"] == reports[1]["bn"]
    assert reports[0]["mask_digest"] == reports[1]["mask_digest"]

    victim = subprocess.Popen(
        _torchrun(launcher, *args, "--checkpoint-every", "1", "--out", str(killed)),
        env=_env(spies),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline and victim.poll() is None:
            position = read_position(killed / CHECKPOINT_NAME)
            if position and position["epoch"] == 1 and position["batch_in_epoch"] > 0:
                _kill_tree(victim.pid)  # torchrun and both workers
                break
            time.sleep(0.02)
    finally:
        if victim.poll() is None:
            _kill_tree(victim.pid)
        victim.wait()
    assert not (killed / "artifact.safetensors").exists(), "the run finished before it could be killed"
    # Steps take milliseconds here: the kill lands a few steps after the position seen, wherever that is.
    position = load_checkpoint(killed / CHECKPOINT_NAME).position
    assert 9 < position["step"] < position["total_steps"]

    resumed = subprocess.run(
        _torchrun(launcher, "search", "--resume", str(killed), "-q"),
        env=_env(spies),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (killed / "artifact.safetensors").read_bytes() == (reference / "artifact.safetensors").read_bytes()

    def metrics(folder):
        return [
            {k: v for k, v in json.loads(line).items() if k not in TIMING_FIELDS}
            for line in (folder / "metrics.jsonl").read_text().splitlines()
        ]

    assert metrics(killed) == metrics(reference)

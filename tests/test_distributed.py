"""torchrun on CPU (gloo): two processes give one valid artifact, the same masks on both ranks, and the
accuracy of a one-process search with the same (global) batch; only rank 0 writes to the run folder.

The oracles are a one-process search of the same arguments and digests each rank writes of its own
state (through the MASKFORGE_MASK_DIGEST_DIR test hook), recomputed here from the artifact.
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

import numpy as np
import pytest
import torch

from helpers import write_image_folder
from maskforge.artifact import load_artifact, pack_mask
from maskforge.checkpoint import CHECKPOINT_NAME, load_checkpoint, read_position
from maskforge.distributed import World, detect
from maskforge.errors import MaskforgeError
from maskforge.search import DIGEST_DIR_ENV, TIMING_FIELDS, SearchConfig, search

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")

RUN_FILES = ["artifact.safetensors", "checkpoint.safetensors", "config.json", "metrics.jsonl"]


def _torchrun(*args: str, nproc: int = 2) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), *args]


def _env(**extra: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200", **extra}
    env.pop("WORLD_SIZE", None)
    return env


def _mask_digest(artifact) -> str:
    """The digest each rank reports, recomputed from the saved artifact: layer name + packed mask bytes."""
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
    with pytest.raises(MaskforgeError, match="not an integer"):
        detect({"WORLD_SIZE": "two"})
    with pytest.raises(MaskforgeError, match="inconsistent torchrun environment"):
        detect({"WORLD_SIZE": "2", "RANK": "2"})


def test_torchrun_two_processes_on_cpu(tmp_path):
    args = ["--arch", "fc", "--k", "0.5", "--epochs", "1", "--max-steps", "12", "--batch-size", "128",
            "--device", "cpu", "-q"]
    out, digests = tmp_path / "ddp", tmp_path / "digests"
    digests.mkdir()
    proc = subprocess.Popen(_torchrun("-m", "maskforge.cli", "search", *args, "--out", str(out)),
                            env=_env(**{DIGEST_DIR_ENV: str(digests)}), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    # Meanwhile, the same search in one process (this one): the oracle for the accuracy.
    single = search(SearchConfig(arch="fc", k=0.5, epochs=1, max_steps=12, batch_size=128, device="cpu",
                                 out=str(tmp_path / "single")), progress=False)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]

    # Rank 0 alone wrote files, and reported once.
    assert sorted(p.name for p in out.iterdir()) == RUN_FILES
    assert stdout.count("done:") == 1
    artifact = load_artifact(out / "artifact.safetensors")  # fully validated
    assert artifact.document["provenance"]["processes"] == 2
    assert artifact.document["provenance"]["batch_size"] == 128
    # Every rank ended with the masks that were saved.
    reported = {p.name: p.read_text().strip() for p in digests.iterdir()}
    assert sorted(reported) == ["masks-rank0.txt", "masks-rank1.txt"]
    assert set(reported.values()) == {_mask_digest(artifact)}

    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [12]
    # Same global batch, same examples per step: the two runs differ only by float summation order.
    assert abs(metrics[-1]["heldout_acc"] - single.heldout_acc) <= 0.03
    assert abs(metrics[-1]["train_loss"] - single.metrics[-1]["train_loss"]) <= 0.01
    same_bits = sum(int((artifact.masks[p] == m).sum()) for p, m in single.artifact.masks.items())
    assert same_bits / artifact.masked_weights > 0.99
    ckpt = load_checkpoint(out / CHECKPOINT_NAME)
    assert ckpt.document["world_size"] == 2 and len(ckpt.document["train_sums"]) == 2


# ---------------------------------------------------------------------------------------------------------
# slow: batch norm + augmentation under torchrun, killed and resumed
# ---------------------------------------------------------------------------------------------------------

# A launcher that registers a tiny conv + BN network (unknown to the installed package) and makes each rank
# also dump its BN statistics next to its mask digest, then runs the normal CLI.
_ENTRY = textwrap.dedent('''
    import importlib, os, sys
    import numpy as np
    import torch.nn as nn
    from maskforge import archs
    search_module = importlib.import_module("maskforge.search")
    from maskforge.layers import MaskedConv2d, MaskedLinear, NonAffineBatchNorm2d, batchnorm_modules

    @archs.register_arch("_test_bn", "test-only conv + BN")
    def build(in_channels, num_classes, image_size, k=0.5):
        return nn.Sequential(MaskedConv2d(in_channels, 8, 3, padding=1, k=k), NonAffineBatchNorm2d(8),
                             nn.ReLU(), nn.AvgPool2d(2), nn.Flatten(),
                             MaskedLinear(8 * (image_size[0] // 2) * (image_size[1] // 2), num_classes, k=k))

    original = search_module._mask_digest
    def digest_and_bn(model):
        folder = os.environ.get(search_module.DIGEST_DIR_ENV)
        if folder:
            stats = {f"{n}.{s}": getattr(bn, s).detach().cpu().numpy()
                     for n, bn in batchnorm_modules(model).items() for s in ("running_mean", "running_var")}
            np.savez(os.path.join(folder, f"bn-rank{os.environ['RANK']}.npz"), **stats)
        return original(model)
    search_module._mask_digest = digest_and_bn

    from maskforge.cli import main
    sys.argv = ["maskforge"] + sys.argv[1:]
    main()
''')


@pytest.mark.slow
def test_torchrun_batchnorm_kill_and_resume_is_exact(tmp_path):
    entry = tmp_path / "entry.py"
    entry.write_text(_ENTRY)
    data = write_image_folder(tmp_path / "images", 64)
    args = ["search", "--arch", "_test_bn", "--k", "0.4", "--data", str(data), "--epochs", "3",
            "--batch-size", "16", "--workers", "0", "--device", "cpu", "-q"]
    reference, killed, digests = tmp_path / "reference", tmp_path / "killed", tmp_path / "digests"
    digests.mkdir()
    done = subprocess.run(_torchrun(str(entry), *args, "--out", str(reference)),
                          env=_env(**{DIGEST_DIR_ENV: str(digests)}), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    # Batch-norm statistics and masks agree on both ranks.
    bn = [np.load(digests / f"bn-rank{r}.npz") for r in (0, 1)]
    assert bn[0].files and all(np.array_equal(bn[0][name], bn[1][name]) for name in bn[0].files)
    assert len({(digests / f"masks-rank{r}.txt").read_text() for r in (0, 1)}) == 1

    victim = subprocess.Popen(_torchrun(str(entry), *args, "--checkpoint-every", "1", "--out", str(killed)),
                              env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                              start_new_session=True)
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline and victim.poll() is None:
            position = read_position(killed / CHECKPOINT_NAME)
            if position and position["epoch"] == 1 and position["batch_in_epoch"] > 0:
                os.killpg(victim.pid, signal.SIGKILL)  # torchrun and both workers
                break
            time.sleep(0.02)
    finally:
        if victim.poll() is None:
            os.killpg(victim.pid, signal.SIGKILL)
        victim.wait()
    assert not (killed / "artifact.safetensors").exists(), "the run finished before it could be killed"
    # Steps take milliseconds here: the kill lands a few steps after the position seen, wherever that is.
    position = load_checkpoint(killed / CHECKPOINT_NAME).position
    assert 8 < position["step"] < position["total_steps"]

    resumed = subprocess.run(_torchrun(str(entry), "search", "--resume", str(killed), "-q"), env=_env(),
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (killed / "artifact.safetensors").read_bytes() == (reference / "artifact.safetensors").read_bytes()

    def metrics(folder):
        return [{k: v for k, v in json.loads(line).items() if k not in TIMING_FIELDS}
                for line in (folder / "metrics.jsonl").read_text().splitlines()]

    assert metrics(killed) == metrics(reference)

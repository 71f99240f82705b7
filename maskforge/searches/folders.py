"""Run folders: their file names, the default folder of a search, what a folder holds, and moving a
previous run's files aside.

A run folder holds (README.md, "What a search does", lists them for users):

* `config.json`: the arguments; `metrics.jsonl` and `metrics.csv`: one record per finished epoch;
* `checkpoint.safetensors`: while the search runs (removed when it finishes unless `keep_checkpoint`);
* `artifact.safetensors`: written when the search finishes: its presence marks a finished search;
* `tensorboard/`: event files, with `tensorboard`;
* `search.lock`: while a search runs in the folder (maskforge.searches.lock);
* `previous-N/`: what the folder held before its finished search was replaced (`overwrite`) or extended.

States (`read_state`): *empty* (none of the run's files), *started* (config or metrics, but no checkpoint
and no artifact: a search that stopped before its first checkpoint, nothing to continue), *unfinished*
(a checkpoint, no artifact) and *finished* (an artifact).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from ..checkpoint import CHECKPOINT_NAME, read_position
from ..errors import MaskforgeError
from ..jsonread import strict_json
from ..schema import RESUME_OVERRIDABLE, SearchConfig
from ..runfiles import ARTIFACT_NAME, CONFIG_NAME, METRICS_CSV_NAME, METRICS_NAME, PREVIOUS_PREFIX, TENSORBOARD_DIR
from .lock import LOCK_NAME

#: The records of a run's progress (they describe the search in the folder, whatever its state).
RECORDS = (CONFIG_NAME, METRICS_NAME, METRICS_CSV_NAME, TENSORBOARD_DIR)
#: What stays in place when a finished search is extended; everything else moves to previous-N/.
KEPT_ON_EXTEND = (*RECORDS, CHECKPOINT_NAME)
#: Fields that do not make two searches different (the folder, and what a resume may change).
NOT_COMPARED = ("out", *RESUME_OVERRIDABLE)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FolderState:
    kind: str  # "empty" | "started" | "unfinished" | "finished"
    recorded: dict | None = None  # config.json's values (None: absent)
    position: dict | None = None  # the checkpoint's position (None: absent or unreadable)

    def differing(self, config: SearchConfig) -> list[str]:
        """The arguments in which `config` differs from the recorded search (all of them if none is recorded)."""
        if self.recorded is None:
            return ["(no config.json)"]
        wanted = config.to_dict()
        return [
            f"{key} {wanted[key]!r} (recorded: {self.recorded.get(key)!r})"
            for key in sorted(wanted)
            if key not in NOT_COMPARED and self.recorded.get(key) != wanted[key]
        ]


def default_folders(config: SearchConfig, root: str | os.PathLike = "runs") -> Iterator[Path]:
    """`runs/<arch>-k<k>-s<seed>` (with `-w<width>` for a width other than 1), then `-2`, `-3`, ...

    A builder reference's characters other than letters, digits, `_`, `.` and `-` become `-`
    (`torchvision:vit_b_16` -> `torchvision-vit_b_16`), so the folder is one path component."""
    name = f"{re.sub(r'[^A-Za-z0-9_.-]', '-', config.arch)}-k{config.k:g}-s{config.seed}"
    if config.width not in (None, 1):
        name += f"-w{config.width:g}"
    yield Path(root) / name
    for number in range(2, 10_000):
        yield Path(root) / f"{name}-{number}"


def read_state(folder: Path) -> FolderState:
    """What `folder` holds (see the module docstring)."""
    if not folder.is_dir():
        return FolderState("empty")
    recorded = _recorded_config(folder)
    if (folder / ARTIFACT_NAME).exists():
        return FolderState("finished", recorded, read_position(folder / CHECKPOINT_NAME))
    if (folder / CHECKPOINT_NAME).exists():
        return FolderState("unfinished", recorded, read_position(folder / CHECKPOINT_NAME))
    if any((folder / name).exists() for name in RECORDS):
        return FolderState("started", recorded)
    return FolderState("empty")


def read_run_config(run_dir: str | os.PathLike) -> SearchConfig:
    """The `SearchConfig` recorded in `run_dir/config.json` (fields newer than the record take defaults)."""
    path = Path(run_dir) / CONFIG_NAME
    try:
        text = path.read_bytes()
    except FileNotFoundError:
        raise MaskforgeError(f"{path} is missing: {run_dir} is not a search run folder") from None
    except OSError as exc:
        raise MaskforgeError(f"cannot read {path}: {exc.strerror or exc}") from None
    values = strict_json(text, str(path), "the search config")  # a duplicate key is refused, as in artifacts
    return SearchConfig.from_dict(values, str(path))


def _recorded_config(folder: Path) -> dict | None:
    return read_run_config(folder).to_dict() if (folder / CONFIG_NAME).exists() else None


def retire(folder: Path, keep: tuple[str, ...] = ()) -> Path | None:
    """Move every entry of `folder` except `keep`, the lock and earlier `previous-N/` into a new
    `previous-N/` (N one more than the highest there). Returns it (None if there was nothing to move)."""
    moving = [
        entry
        for entry in sorted(folder.iterdir())
        if entry.name not in (*keep, LOCK_NAME) and not _is_previous(entry.name)
    ]
    if not moving:
        return None
    numbers = [int(entry.name[len(PREVIOUS_PREFIX) :]) for entry in folder.iterdir() if _is_previous(entry.name)]
    target = folder / f"{PREVIOUS_PREFIX}{max(numbers, default=0) + 1}"
    try:
        target.mkdir()
        for entry in moving:
            os.replace(entry, target / entry.name)  # same folder tree: a rename, never a copy
    except OSError as exc:
        raise MaskforgeError(
            f"cannot move the previous run's files from {folder} to {target}: {exc.strerror or exc}"
        ) from None
    log.info("moved the previous files of %s (%s) to %s", folder, ", ".join(e.name for e in moving), target)
    return target


def clear_records(folder: Path) -> None:
    """Remove the records of a search that never wrote a checkpoint (nothing in them can be continued)."""
    for name in RECORDS:
        path = folder / name
        try:
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
        except OSError as exc:
            raise MaskforgeError(f"cannot remove {path}: {exc.strerror or exc}") from None


def _is_previous(name: str) -> bool:
    return name.startswith(PREVIOUS_PREFIX) and name[len(PREVIOUS_PREFIX) :].isdigit()

"""The search's metrics in the files people read them with: `metrics.jsonl` (one JSON object per finished
epoch), `metrics.csv` (the same records as a table) and, with `tensorboard`, TensorBoard event files in
`tensorboard/`.

The JSON and CSV files are rewritten whole after every epoch, atomically (a reader or a crash sees the
previous version or the new one). TensorBoard's event files are append-only logs written by its own
writer; a resumed search appends a new event file to the same folder, which TensorBoard merges (an epoch
redone after a kill appears twice at the same step; TensorBoard shows the later value).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
from pathlib import Path

from .errors import MaskforgeError
from .fileio import atomic_write
from .jsonread import strict_json
from .runfiles import METRICS_CSV_NAME, METRICS_NAME, TENSORBOARD_DIR
from .schema import EpochRecord, SearchConfig, parse

#: Columns of metrics.csv, in order (the fields of an epoch record, maskforge.schema.EpochRecord).
CSV_COLUMNS = (
    "epoch",
    "step",
    "lr",
    "train_loss",
    "train_acc",
    "heldout_loss",
    "heldout_acc",
    "images_per_s",
    "epoch_seconds",
)
#: The scalars written to TensorBoard, under these tags.
TENSORBOARD_TAGS = {
    "train_loss": "loss/train",
    "heldout_loss": "loss/heldout",
    "train_acc": "accuracy/train",
    "heldout_acc": "accuracy/heldout",
    "lr": "lr",
    "images_per_s": "throughput/images_per_s",
}

log = logging.getLogger(__name__)


def write_metrics(out: str | os.PathLike, metrics: list[dict]) -> None:
    """`metrics.jsonl` and `metrics.csv`: the records of the finished epochs (rewritten whole)."""
    atomic_write(Path(out) / METRICS_NAME, "".join(json.dumps(m, sort_keys=True) + "\n" for m in metrics))
    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(metrics)
    atomic_write(Path(out) / METRICS_CSV_NAME, table.getvalue())


def read_metrics(out: str | os.PathLike) -> list[dict]:
    """The per-epoch records of run folder `out` (`metrics.jsonl`); [] when no epoch has finished.

    Every line must be an epoch record (`maskforge.schema.EpochRecord`, NaN allowed where a search
    diverged); a damaged one is a `MaskforgeError` naming the file's line (`metrics.jsonl line 2: ...`)."""
    path = Path(out) / METRICS_NAME
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as exc:
        raise MaskforgeError(f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}") from None
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            where = f"{path} line {number}"
            record = strict_json(line, where, "the metrics record", allow_nan=True)
            if not isinstance(record, dict):
                raise MaskforgeError(f"{where}: metrics record: must be an object, got {type(record).__name__}")
            parse(EpochRecord, record, f"{where}: metrics record")
            records.append(record)
    return records


def check_tensorboard(config: SearchConfig) -> None:
    """Refuse `tensorboard` early (before any file is written) when the package is missing."""
    if config.tensorboard:
        _summary_writer_class()


def _summary_writer_class():
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise MaskforgeError(
            "tensorboard needs the tensorboard package, which is not installed: pip install 'maskforge[tensorboard]'"
        ) from None
    return SummaryWriter


class TensorBoardLog:
    """Epoch records as TensorBoard scalars at their global step (rank 0). A failing write (a full disk)
    is reported once as a warning and ends the TensorBoard log; the search goes on."""

    def __init__(self, out: str | os.PathLike) -> None:
        self.folder = Path(out) / TENSORBOARD_DIR
        self._writer = _summary_writer_class()(log_dir=str(self.folder))

    def add_epoch(self, record: dict) -> None:
        if self._writer is None:
            return
        try:
            for field, tag in TENSORBOARD_TAGS.items():
                self._writer.add_scalar(tag, record[field], record["step"])
            self._writer.flush()
        except Exception as exc:  # noqa: BLE001 - TensorBoard's writer raises what its I/O raises
            log.warning("stopped writing TensorBoard events to %s: %s", self.folder, exc)
            self.close()

    def close(self) -> None:
        if self._writer is not None:
            writer, self._writer = self._writer, None
            try:
                writer.close()
            except Exception:  # noqa: BLE001 - nothing more to do for a log that cannot be written
                pass

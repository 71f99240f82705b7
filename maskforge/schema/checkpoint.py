"""The checkpoint's JSON document (docs/SCALE.md, "Checkpoints"), defined and validated here once."""

from __future__ import annotations

from typing import Annotated, Any, Literal, Optional

from pydantic import model_validator

from .artifact import MAX_SEED, ArchArgs, Distribution, TopkRule, check_structure_record
from .base import Field, Flag, Hex64, Integer, Measurement, Number, Text, check_format, parse, record
from .config import SearchConfig

FORMAT_NAME = "maskforge-checkpoint"
FORMAT_VERSION = 1
METADATA_KEY = "maskforge_checkpoint"

Count = Annotated[Integer, Field(ge=0)]


@record(frozen=True, label="identity")
class Identity:
    """Which network the checkpoint's scores belong to."""

    arch: Text
    arch_args: ArchArgs
    k: Annotated[Number, Field(gt=0, le=1)]
    seed: Annotated[Integer, Field(ge=0, le=MAX_SEED)]
    init: Distribution
    scale_fan: Flag
    topk: TopkRule = "layer"
    # builder references, since issue 15 (older checkpoints lack them: a resume then compares shapes only)
    library: Optional[Text] = Field(None, description="builder references: as the artifact's arch.library")
    structure: Optional[list[Text]] = Field(
        None,
        description="builder references: the built model's structure at search start, as the artifact's "
        "arch.structure; a resume is refused when the code now builds another",
    )
    structure_digest: Optional[Hex64] = Field(None, description="SHA-256 of the structure lines joined by newlines")
    calls: Optional[list[Text]] = Field(None, description="builder references: as the artifact's arch.calls")
    calls_digest: Optional[Hex64] = Field(None, description="SHA-256 of the call lines joined by newlines")

    @model_validator(mode="after")
    def _structure(self) -> "Identity":
        check_structure_record(self.structure, self.structure_digest)
        check_structure_record(self.calls, self.calls_digest, "calls")
        return self


@record(frozen=True, label="position")
class Position:
    """Where the search stands: `epoch` being run (0-based), batches of it done, optimizer steps done."""

    epoch: Count
    batch_in_epoch: Count
    step: Count
    steps_per_epoch: Count
    total_steps: Count

    @model_validator(mode="after")
    def _consistent(self) -> "Position":
        if self.batch_in_epoch > self.steps_per_epoch or self.step > self.total_steps:
            raise ValueError(
                f"position is inconsistent: batch {self.batch_in_epoch} of {self.steps_per_epoch}, "
                f"step {self.step} of {self.total_steps}"
            )
        return self


@record(frozen=True, label="metrics record")
class EpochRecord:
    """One line of metrics.jsonl: the state at the end of an epoch (NaN where a search diverged)."""

    epoch: Annotated[Integer, Field(ge=1)]
    step: Count
    lr: Measurement
    train_loss: Measurement
    train_acc: Measurement
    heldout_loss: Measurement
    heldout_acc: Measurement
    images_per_s: Measurement
    epoch_seconds: Measurement


@record(frozen=True, label="digests")
class CheckpointDigests:
    tensors: dict[Text, Hex64]
    document: Hex64


TrainSums = tuple[Measurement, Count, Count]  # loss sum, correct, seen of the current epoch on one rank


@record(frozen=True, label="checkpoint")
class CheckpointDocument:
    """The JSON document under the metadata key `maskforge_checkpoint`: what is being searched, where the
    search stands, and the seal."""

    identity: Identity
    config: SearchConfig
    position: Position
    train_sums: Annotated[
        list[TrainSums], Field(description="per rank: [loss_sum, correct, seen] of the current epoch")
    ]
    metrics: Annotated[list[EpochRecord], Field(description="the records of the finished epochs")]
    world_size: Annotated[Integer, Field(ge=1, description="processes that wrote it (a resume must use as many)")]
    versions: dict[Text, Text]
    format: Literal[FORMAT_NAME]
    format_version: Annotated[Integer, Field(ge=FORMAT_VERSION, le=FORMAT_VERSION)]
    digests: CheckpointDigests

    @model_validator(mode="after")
    def _one_row_per_rank(self) -> "CheckpointDocument":
        if len(self.train_sums) != self.world_size:
            raise ValueError(f"train_sums has {len(self.train_sums)} rows for {self.world_size} process(es)")
        return self


def parse_checkpoint_document(raw: Any, label: str) -> CheckpointDocument:
    """Validate a parsed checkpoint document: format and version first, then every field."""
    check_format(raw, FORMAT_NAME, FORMAT_VERSION, label, "checkpoint")
    return parse(CheckpointDocument, raw, label)

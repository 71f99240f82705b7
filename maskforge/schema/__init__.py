"""One typed schema for every document maskforge reads or writes, each defined and validated once.

* `SearchConfig` (config.py): the arguments of a search (CLI options, `config.json`, the checkpoint);
* `InputSpec` (spec.py): what a model expects as input;
* `ArtifactDocument` (artifact.py): the artifact's JSON document (docs/FORMAT.md 2.3);
* `CheckpointDocument` (checkpoint.py): the checkpoint's JSON document (docs/SCALE.md).

The building blocks (number types that accept any JSON spelling, the `record` decorator, the one parser
that turns validation errors into `MaskforgeError`s naming the field) are in base.py. This package
imports neither torch nor the CLI: `maskforge --help` reads the config's descriptions from it.
"""

from .artifact import (
    FORMAT_NAME,
    FORMAT_VERSION,
    METADATA_KEY,
    PROVENANCE_FIELDS,
    TOPK_RULES,
    ArchArgs,
    ArtifactDocument,
    parse_artifact_document,
)
from .base import dump, json_schema, parse
from .checkpoint import CheckpointDocument, EpochRecord, Position, parse_checkpoint_document
from .config import RESUME_EXTENDABLE, RESUME_OVERRIDABLE, SearchConfig, field_kind
from .spec import InputSpec

__all__ = [
    "SearchConfig",
    "field_kind",
    "RESUME_OVERRIDABLE",
    "RESUME_EXTENDABLE",
    "InputSpec",
    "ArchArgs",
    "ArtifactDocument",
    "parse_artifact_document",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "METADATA_KEY",
    "PROVENANCE_FIELDS",
    "TOPK_RULES",
    "CheckpointDocument",
    "EpochRecord",
    "Position",
    "parse_checkpoint_document",
    "parse",
    "dump",
    "json_schema",
]

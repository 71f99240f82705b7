"""Which command takes which file: the second half of "X is an ONNX model, not an artifact: ..."."""

from __future__ import annotations

from pathlib import Path

from maskforge.filekind import require_kind
from maskforge.runfiles import ARTIFACT_NAME

TAKEN_BY = {
    "onnx": "`maskforge eval {path}` evaluates it, `maskforge predict {path} IMAGE...` classifies images with it, "
    "and `maskforge verify {path} --artifact ARTIFACT` checks it against the artifact it came from",
    "torch_export": "reload it in Python with maskforge.load_torch_export; `maskforge inspect` reads the artifact "
    "it was exported from",
    "checkpoint": "`maskforge search --resume FOLDER` continues the run it belongs to; the finished run's "
    f"{ARTIFACT_NAME} is what `maskforge inspect` reads",
    "image": "`maskforge predict MODEL {path}` classifies it",
}


def require_artifact(path: Path) -> None:
    """Refuse, naming what it is and what takes it, a file that is clearly not an artifact (and a run
    folder, naming the artifact inside it)."""
    hints = {kind: text.format(path=path) for kind, text in TAKEN_BY.items()}
    if (Path(path) / ARTIFACT_NAME).is_file():
        hints["folder"] = f"give the artifact of that run, {Path(path) / ARTIFACT_NAME}"
    require_kind(path, ("artifact",), "a maskforge artifact", hints)

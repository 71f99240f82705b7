"""SHA-256 seals shared by the files maskforge writes (artifacts and checkpoints).

Both are a safetensors file plus one JSON document; the document records the SHA-256 of every stored
tensor's raw bytes and of its own canonical JSON without the `digests` member (docs/FORMAT.md, 2.3).
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import torch


def canonical_json(value, *, allow_nan: bool = False) -> str:
    """Sorted keys, no whitespace, ASCII: the same value always gives the same bytes."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=allow_nan)


def document_digest(document: dict, *, allow_nan: bool = False) -> str:
    """SHA-256 of the canonical JSON of `document` without its `digests` member."""
    body = {key: value for key, value in document.items() if key != "digests"}
    return hashlib.sha256(canonical_json(body, allow_nan=allow_nan).encode("utf-8")).hexdigest()


def tensor_digest(tensor: np.ndarray | torch.Tensor) -> str:
    """SHA-256 of a tensor's raw bytes in C order, as safetensors stores them."""
    if isinstance(tensor, torch.Tensor):
        tensor = tensor.detach().cpu().contiguous().numpy()
    return hashlib.sha256(np.ascontiguousarray(tensor).reshape(-1).view(np.uint8)).hexdigest()


def is_int(value) -> bool:
    """A JSON integer (Python's bool is an int, but not one a document means)."""
    return isinstance(value, int) and not isinstance(value, bool)

"""The size measure every report uses: a file's size in bits per masked weight (docs/FORMAT.md: an artifact
aims at about 1 bit per masked weight plus its batch-norm statistics and metadata)."""


def bits_per_weight(nbytes: int, masked_weights: int) -> float:
    """8 x `nbytes` / `masked_weights`: bits of file per weight of the masked layers (kept or not)."""
    return 8.0 * nbytes / masked_weights

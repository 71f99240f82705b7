"""`python -m maskforge.cli ...` (what `torchrun -m maskforge.cli search ...` runs on every process)."""

from . import main

main()

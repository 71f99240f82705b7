"""`python -m maskforge ...`: the `maskforge` command (`torchrun -m maskforge search ...` works too)."""

from maskforge.cli import main

main()

#!/usr/bin/env python
"""The accelerator recipe on the CPU against the plain fp32 search: held-out accuracy, images/s, wall time.

Runs the same `maskforge search` (same arguments, data, seed) once per variant, one after the other:

* `fp32`      — the CPU default: float32, standard layout, the numpy masker;
* `recipe`    — what a GPU search runs, on the CPU: bf16 autocast, channels_last, the torch masker;
* `compiled`  — the recipe under torch.compile (inductor: C++ kernels built with the machine's compiler;
                the wall time includes compiling, which an inductor cache on disk shortens on later runs).

    python benchmarks/recipe_accuracy.py                              # conv4, 2 epochs on the demo data
    python benchmarks/recipe_accuracy.py --arch fc --epochs 3 --variants fp32,recipe --json

Images/s are training images per second of the last epoch (`metrics.jsonl`); on a shared machine read them
as rough figures and rerun on a quiet one.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

VARIANTS = {
    "fp32": {},
    "recipe": {"precision": "bf16", "channels_last": True, "masker": "torch"},
    "compiled": {"precision": "bf16", "channels_last": True, "masker": "torch", "compile": True},
}


def run_variant(name: str, args: argparse.Namespace, out: Path) -> dict:
    from maskforge.searches import SearchConfig, search

    config = SearchConfig(
        arch=args.arch,
        data=args.data,
        k=args.k,
        epochs=args.epochs,
        batch_size=args.batch_size,
        seed=args.seed,
        device="cpu",
        workers=0,
        out=str(out / name),
        **VARIANTS[name],
    )
    started = time.perf_counter()
    result = search(config)
    wall = time.perf_counter() - started
    return {
        "variant": name,
        "arch": args.arch,
        "epochs": args.epochs,
        "batch": args.batch_size,
        "heldout_acc_by_epoch": [m["heldout_acc"] for m in result.metrics],
        "heldout_acc": result.heldout_acc,
        "images_per_s_last_epoch": result.metrics[-1]["images_per_s"],
        "wall_s": wall,
        **{
            key: result.artifact.document["provenance"][key]
            for key in ("precision", "channels_last", "masker", "compile")
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--arch", default="conv4")
    parser.add_argument("--data", default="mnist5k")
    parser.add_argument("--k", type=float, default=0.5)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma list of " + ", ".join(VARIANTS))
    parser.add_argument("--json", action="store_true", help="one JSON object per variant instead of a table")
    args = parser.parse_args(argv)
    chosen = args.variants.split(",")
    if set(chosen) - set(VARIANTS):
        parser.error(f"--variants: choose from {', '.join(VARIANTS)}")
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    rows = []
    with tempfile.TemporaryDirectory(prefix="maskforge-recipe-") as tmp:
        for name in chosen:
            rows.append(run_variant(name, args, Path(tmp)))
            if args.json:
                print(json.dumps(rows[-1]), flush=True)
    if not args.json:
        base = next((r["heldout_acc"] for r in rows if r["variant"] == "fp32"), None)
        print(
            "| variant | precision | channels_last | masker | compile | held-out accuracy by epoch | vs fp32 "
            "| images/s (last epoch) | wall s |"
        )
        print("|---|---|---|---|---|---|---:|---:|---:|")
        for r in rows:
            delta = "—" if base is None else f"{100 * (r['heldout_acc'] - base):+.1f} pt"
            by_epoch = ", ".join(f"{100 * a:.1f} %" for a in r["heldout_acc_by_epoch"])
            print(
                f"| {r['variant']} | {r['precision']} | {r['channels_last']} | {r['masker']} | {r['compile']} "
                f"| {by_epoch} | {delta} | {r['images_per_s_last_epoch']:,.0f} | {r['wall_s']:.1f} |"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

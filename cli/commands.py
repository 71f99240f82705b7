"""The commands, in the order `maskforge --help` lists them: name -> (module, one-line summary).

A command's module is imported only when the command runs (or its own --help is asked for), so
`maskforge --help` starts without importing torch. Each module registers its command on `app` with
`@app.command(name)`; the summary must be the first line of that command's docstring
(tests/test_cli.py checks it).
"""

from __future__ import annotations

from typing import NamedTuple


class Command(NamedTuple):
    module: str
    summary: str


COMMANDS: dict[str, Command] = {
    "search": Command(
        "maskforge.cli.search_cmd",
        "Search a subnetwork of a seeded random network with edge-popup and save it as an artifact.",
    ),
    "inspect": Command(
        "maskforge.cli.inspect_cmd",
        "Show an artifact's metadata, each layer's shape and density, the file size and bits per weight.",
    ),
    "verify": Command(
        "maskforge.cli.verify_cmd",
        "Verify an artifact: layout, schema, digests, structure, masks and every regenerated weight.",
    ),
    "export": Command(
        "maskforge.cli.export_cmd",
        "Materialize an artifact and export it; every file is checked in onnxruntime before it is kept.",
    ),
    "eval": Command(
        "maskforge.cli.eval_cmd",
        "Evaluate a model in onnxruntime: accuracy, agreement with float32, latency, memory and size.",
    ),
    "predict": Command(
        "maskforge.cli.predict_cmd", "Classify images: the top-5 classes of each, with softmax probabilities."
    ),
    "sweep": Command(
        "maskforge.cli.sweep_cmd",
        "Run a grid of searches: every combination of the comma lists, each seed, under one folder.",
    ),
    "plot": Command("maskforge.cli.plot_cmd", "Draw figures (PNG + SVG) with matplotlib."),
    "archs": Command(
        "maskforge.cli.archs_cmd",
        "List the architectures with their masked-weight counts (CIFAR-10 and ImageNet shapes).",
    ),
}

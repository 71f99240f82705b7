"""maskforge: find a subnetwork in a seeded random network (edge-popup) and ship it as seed + mask.

The public API mirrors the CLI, one function per command: `search`/`resume` (maskforge search),
`inspect_artifact`, `export_onnx`/`export_torch`, `evaluate`, `predict`, `verify_artifact`/`verify_onnx`,
`sweep`/`collect_sweep` (maskforge sweep), `train_dense` (the dense baseline), `plot` (maskforge plot).
Names load on first use, so `import maskforge` (and `maskforge --help`) does not import torch.

>>> import maskforge
>>> result = maskforge.search(maskforge.SearchConfig(arch="conv4", k=0.5, epochs=1))   # doctest: +SKIP
>>> model = maskforge.materialize(result.artifact_path)                                 # doctest: +SKIP
"""

import importlib
import sys
import types

__version__ = "0.2.0"

from .errors import MaskforgeError  # noqa: E402  (light: no torch)

#: public name -> the module that defines it
_PUBLIC = {
    "ARCHS": "archs",
    "arch_names": "registry",
    "list_archs": "registry",
    "create_model": "archs",
    "builder_reference": "convert",
    "Artifact": "artifact",
    "load_artifact": "artifact",
    "save_artifact": "artifact",
    "inspect_artifact": "artifact",
    "SearchConfig": "schema",
    "InputSpec": "schema",
    "SearchResult": "searches",
    "search": "searches",
    "resume": "searches",
    "SearchInterrupted": "searches",
    "materialize": "materialization",
    "export_onnx": "export",
    "export_torch": "export",
    "load_torch_export": "export",
    "evaluate": "evaluation",
    "predict": "prediction",
    "verify_artifact": "verify",
    "verify_onnx": "verify",
    "sweep": "sweeps",
    "collect_sweep": "sweeps",
    "DenseConfig": "dense",
    "train_dense": "dense",
    "plot": "plotting",
}

__all__ = ["__version__", "MaskforgeError", *_PUBLIC]


class _Package(types.ModuleType):
    """Loads public names on first use. No module shares a public function's name (`search` lives in
    `searches/`, `materialize` in `materialization.py`, ...), so importing a module never hides a function."""

    def __getattr__(self, name: str):
        if name not in _PUBLIC:
            raise AttributeError(f"module 'maskforge' has no attribute {name!r}")
        value = getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
        super().__setattr__(name, value)
        return value

    def __dir__(self) -> list[str]:
        return sorted({*super().__dir__(), *_PUBLIC})


sys.modules[__name__].__class__ = _Package

"""maskforge: find a subnetwork in a seeded random network (edge-popup) and ship it as seed + mask.

The public API mirrors the CLI, one function per command: `search`/`resume` (maskforge search),
`inspect_artifact`, `export_onnx`/`export_torch`, `evaluate`, `verify_artifact`/`verify_onnx`, `sweep`/
`collect_sweep` (maskforge sweep), `train_dense` (the dense baseline).

>>> import maskforge
>>> result = maskforge.search(maskforge.SearchConfig(arch="conv4", k=0.5, epochs=1))   # doctest: +SKIP
>>> model = maskforge.materialize(result.artifact_path)                                 # doctest: +SKIP
"""

__version__ = "0.1.0"

from .errors import MaskforgeError  # noqa: E402
from .archs import ARCHS, arch_names, create_model, list_archs  # noqa: E402
from .artifact import Artifact, inspect_artifact, load_artifact, save_artifact  # noqa: E402
from .search import SearchConfig, SearchResult, resume, search  # noqa: E402
from .materialize import materialize  # noqa: E402
from .export import export_onnx, export_torch, load_torch_export  # noqa: E402
from .evaluate import evaluate  # noqa: E402
from .verify import verify_artifact, verify_onnx  # noqa: E402
from .dense import DenseConfig, train_dense  # noqa: E402
from .sweeps import collect_sweep, sweep  # noqa: E402

__all__ = [
    "__version__", "MaskforgeError",
    "ARCHS", "arch_names", "list_archs", "create_model",
    "Artifact", "load_artifact", "save_artifact", "inspect_artifact",
    "SearchConfig", "SearchResult", "search", "resume",
    "materialize", "export_onnx", "export_torch", "load_torch_export",
    "evaluate", "verify_artifact", "verify_onnx",
    "sweep", "collect_sweep", "DenseConfig", "train_dense",
]

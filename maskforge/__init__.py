"""maskforge: find a subnetwork in a seeded random network (edge-popup) and ship it as seed + mask.

The public API mirrors the CLI: one function per command.

>>> import maskforge
>>> result = maskforge.search(maskforge.SearchConfig(arch="conv4", k=0.5, epochs=1))   # doctest: +SKIP
>>> artifact = maskforge.load_artifact(result.artifact_path)                            # doctest: +SKIP
"""

__version__ = "0.1.0"

from .errors import MaskforgeError  # noqa: E402
from .archs import ARCHS, arch_names, create_model  # noqa: E402
from .artifact import Artifact, load_artifact, save_artifact  # noqa: E402
from .search import SearchConfig, SearchResult, search  # noqa: E402

__all__ = ["MaskforgeError", "ARCHS", "arch_names", "create_model", "Artifact", "load_artifact",
           "save_artifact", "SearchConfig", "SearchResult", "search", "__version__"]

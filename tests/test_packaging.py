"""pyproject.toml lists every package folder, so a non-editable install (`pip install .`, a wheel) holds
the whole library: an editable install finds unlisted subpackages anyway, which hides the omission."""

from __future__ import annotations

from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parents[1]


def _package_folders() -> dict[str, Path]:
    """Every folder holding an __init__.py, as the dotted name it is installed under."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    package_dir = project["tool"]["setuptools"]["package-dir"]
    found = {}
    for top, folder in package_dir.items():
        for init in sorted((ROOT / folder).rglob("__init__.py")):
            relative = init.parent.relative_to(ROOT / folder).parts
            found[".".join((top, *relative))] = init.parent
    return found


def test_every_package_folder_is_listed_in_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    listed = set(project["tool"]["setuptools"]["packages"])
    folders = _package_folders()
    assert folders, "no package folder found: the test would pass vacuously"
    missing = sorted(set(folders) - listed)
    assert not missing, f"package folders missing from pyproject's packages: {missing}"
    stale = sorted(listed - set(folders))
    assert not stale, f"pyproject lists packages with no folder: {stale}"


# --- dependencies: every third-party import is declared -----------------------------------------------

#: Imports that are optional by design: each is guarded where it is imported (ImportError -> a clear
#: message), so it is not a dependency. The test checks the guard is there.
OPTIONAL_IMPORTS = {"triton": "torch.compile's GPU code generator; --compile names it when missing"}
#: Import name -> distribution name, where they differ.
DISTRIBUTIONS = {"PIL": "pillow"}


def _imports_of_the_package() -> dict[str, set[bool]]:
    """Top-level names imported anywhere in maskforge/ and cli/ -> whether each import is guarded by an
    `except ImportError` (or ModuleNotFoundError) around it."""
    import ast
    import sys

    found: dict[str, set[bool]] = {}
    for folder in ("maskforge", "cli"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            tree = ast.parse(path.read_text(encoding="utf-8"))
            guarded = set()
            for node in ast.walk(tree):
                if isinstance(node, ast.Try) and any(
                    isinstance(h.type, ast.Name) and h.type.id in ("ImportError", "ModuleNotFoundError")
                    for h in node.handlers
                ):
                    guarded.update(id(inner) for stmt in node.body for inner in ast.walk(stmt))
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    top = name.split(".")[0]
                    if top not in sys.stdlib_module_names and top != "maskforge":
                        found.setdefault(top, set()).add(id(node) in guarded)
    return found


def _declared(extra: str | None = None) -> set[str]:
    import re

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = project["dependencies"] if extra is None else project["optional-dependencies"][extra]
    return {re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0].lower() for requirement in requirements}


def test_every_third_party_import_is_a_declared_dependency():
    imported = _imports_of_the_package()
    assert {"torch", "numpy", "pydantic"} <= set(imported), "the import reader found too little"
    required = {DISTRIBUTIONS.get(name, name).lower() for name in imported if name not in OPTIONAL_IMPORTS}
    declared = _declared()
    assert sorted(required - declared) == [], "imported but not declared in [project] dependencies"
    assert sorted(declared - required) == [], "declared but never imported (a stale dependency)"


def test_optional_imports_are_guarded():
    imported = _imports_of_the_package()
    for name in OPTIONAL_IMPORTS:
        assert imported.get(name) == {True}, f"{name} is imported without an ImportError guard somewhere"

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

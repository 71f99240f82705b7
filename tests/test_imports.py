"""The package's imports, read from the source (ast), not by importing it: no module takes part in an import
cycle (function-level imports included: a lazy import that only breaks a loop at run time is still a loop),
and the library never imports the command line. The layering between the library's modules is checked by
import-linter in CI (pyproject.toml, [tool.importlinter]); these two rules also hold without it."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
#: The installed package names of the two source trees (pyproject maps cli/ to maskforge.cli).
TREES = {"maskforge": ROOT / "maskforge", "maskforge.cli": ROOT / "cli"}


def _modules() -> dict[str, Path]:
    found = {}
    for package, folder in TREES.items():
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join([package, *parts])] = path
    return found


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package's modules that module `name` imports anywhere in its body."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            # `from x import y`: y is a submodule of x, or a name defined in x
            candidates = [
                f"{source}.{alias.name}" if f"{source}.{alias.name}" in modules else source for alias in node.names
            ]
        else:
            continue
        for candidate in candidates:
            while candidate and candidate not in modules:  # `import a.b.c` of a name inside a module
                candidate = candidate.rpartition(".")[0]
            if candidate and candidate != name:
                targets.add(candidate)
    return targets


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_graph_is_read_correctly():
    """The reader itself, on edges known to exist (relative, parent-relative, `from . import module`,
    function-level and absolute imports): an empty graph would make the cycle test pass vacuously."""
    graph = _graph()
    assert "maskforge.runfiles" in graph["maskforge.searches.folders"]  # from ..runfiles import ...
    assert "maskforge.searches.plan" in graph["maskforge.searches"]  # from .plan import ...
    assert "maskforge.distributed" in graph["maskforge.searches"]  # from .. import distributed
    assert "maskforge.sweeps" in graph["maskforge.plotting"]  # inside a function
    assert "maskforge.plotting" in graph["maskforge.cli.plot_cmd"]  # from maskforge.plotting import
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycle_in_the_package():
    assert _cycles(_graph()) == []


def test_the_library_never_imports_the_command_line():
    # maskforge/__main__.py is the command line's entry point (`python -m maskforge`), not library code
    offenders = {
        name: sorted(t for t in targets if t.startswith("maskforge.cli"))
        for name, targets in _graph().items()
        if not name.startswith("maskforge.cli") and name != "maskforge.__main__"
    }
    assert {name: found for name, found in offenders.items() if found} == {}


def test_no_module_shares_a_public_name():
    """`import maskforge.X` sets the package attribute X to the module: a module named like a public
    function (`search`, `plot`, ...) would replace the function after any import of the module."""
    import maskforge

    modules = set(_graph())
    clashes = sorted(name for name in maskforge._PUBLIC if f"maskforge.{name}" in modules)
    assert clashes == []
    assert {"search", "materialize", "predict", "plot"} <= set(maskforge._PUBLIC)  # the names that clashed

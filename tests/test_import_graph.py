"""The import graph of the project's packages: no circle, the one dependency rule, and no module of
the aggregation service over :data:`MAX_LINES` lines (issue 12).

Every ``.py`` file of ``hw_profiles``, ``edge_runtime``, ``broker_server`` and ``sdk`` is parsed
with :mod:`ast` (nothing is imported), and every ``import`` statement counts, at module level, in a
function, or under ``if TYPE_CHECKING:``: a lazy import hides a circle from Python, not from the
design. An edge goes from a module to the project module it names: ``from p import m`` names the
submodule ``p.m`` when there is one and the package ``p`` otherwise, and relative imports are
resolved against the importing module's package. Parent packages that Python initialises on the way
(``p/__init__.py`` for ``import p.m``) are not edges, as in import-linter.

ARCHITECTURE.md, "Packages and the one dependency rule"::

    hw_profiles  <-  edge_runtime  <-  broker_server  <-  sdk

"A package imports only packages to its left. Nothing imports to the right." The device side
must also stay free of the server's numerical libraries (scikit-learn, SciPy).
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
LAYERS = ("hw_profiles", "edge_runtime", "broker_server", "sdk")
"""The project's packages, each allowed to import only those before it."""

SERVER_ONLY_LIBRARIES = ("sklearn", "scipy")
"""Third-party packages in the server extra only: the edge install does not have them."""

MAX_LINES = 500
"""The most lines a ``broker_server`` module may have (issue 12: "no module over about 500 lines")."""

GENERATED_MARK = "(generated)"
"""A module whose first docstring line says this is a generated table, exempt from :data:`MAX_LINES`."""

Graph = dict[str, set[str]]


def module_name(path: Path, root: Path) -> str:
    """The dotted module name of a file under ``root`` (a package's ``__init__`` is the package)."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_modules(root: Path, packages: Iterable[str] = LAYERS) -> dict[str, Path]:
    """Every module of ``packages`` under ``root``, by dotted name."""
    return {
        module_name(path, root): path
        for package in packages
        for path in sorted((root / package).rglob("*.py"))
        if "__pycache__" not in path.parts
    }


def imported_names(tree: ast.AST, module: str, is_package: bool) -> set[str]:
    """The absolute names each import statement in ``tree`` (anywhere in it) reaches for.

    ``import a.b`` gives ``a.b``; ``from a import b`` gives ``a.b`` and ``a`` (the caller keeps the
    one that is a module); relative imports are resolved against ``module``'s package.
    """
    package = module.split(".") if is_package else module.split(".")[:-1]
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                if node.level - 1 > len(package):
                    raise ValueError(f"{module}: relative import beyond the top-level package")
                base = package[: len(package) - (node.level - 1)]
                parent = ".".join([*base, *([node.module] if node.module else [])])
            else:
                parent = node.module or ""
            names.add(parent)
            names.update(f"{parent}.{alias.name}" if parent else alias.name for alias in node.names)
    return names


def resolve(name: str, modules: Iterable[str]) -> str | None:
    """The project module an imported ``name`` refers to: itself, or its longest module prefix."""
    known = set(modules)
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in known:
            return candidate
    return None


def import_graph(root: Path = REPO, packages: Iterable[str] = LAYERS) -> Graph:
    """Project module -> the project modules it imports (self-imports left out)."""
    modules = project_modules(root, packages)
    graph: Graph = {}
    for module, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        targets = {resolve(n, modules) for n in imported_names(tree, module, path.name == "__init__.py")}
        # ``from a import b`` adds both ``a.b`` and ``a``: keep ``a`` only when ``b`` is no module
        named = {t for t in targets if t is not None and t != module}
        graph[module] = named - {t for t in named if any(o.startswith(t + ".") for o in named)}
    return graph


def find_cycle(graph: Mapping[str, Iterable[str]]) -> list[str] | None:
    """A cycle of ``graph`` as ``[a, b, ..., a]``, or None if it has none (depth-first, iterative)."""
    state: dict[str, int] = {}  # absent: unseen, 1: on the current path, 2: done
    for start in sorted(graph):
        if start in state:
            continue
        path = [start]
        stack = [iter(sorted(graph.get(start, ())))]
        state[start] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            elif nxt not in state:
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph.get(nxt, ()))))
    return None


def layer_violations(graph: Mapping[str, Iterable[str]], layers: tuple[str, ...] = LAYERS) -> list[str]:
    """Edges that import a package to the right of (or not left of) the importer's package."""
    rank = {name: i for i, name in enumerate(layers)}
    out = []
    for src, targets in sorted(graph.items()):
        for dst in sorted(targets):
            a, b = src.split(".")[0], dst.split(".")[0]
            if a != b and rank[b] > rank[a]:
                out.append(f"{src} -> {dst}")
    return out


@pytest.fixture(scope="module")
def graph() -> Graph:
    return import_graph()


def test_the_graph_sees_the_project(graph: Graph) -> None:
    # a parser that found no edges would pass every check below
    assert {"sdk.cli", "edge_runtime.wire", "broker_server.service", "hw_profiles"} <= set(graph)
    assert "edge_runtime.errors" in graph["broker_server.aggregation"]
    assert "broker_server.aggregation" in graph["broker_server.exact"]
    # a function-level import (the artifact builder is loaded only when needed)
    assert "broker_server.artifacts" in graph["broker_server.publisher"]
    # ``from edge_runtime import wire`` is the submodule, not the package
    assert "edge_runtime.wire" in graph["edge_runtime.agent"]


def test_no_module_imports_in_a_circle(graph: Graph) -> None:
    cycle = find_cycle(graph)
    assert cycle is None, "import circle: " + " -> ".join(cycle or [])


def test_each_package_imports_only_packages_to_its_left(graph: Graph) -> None:
    assert layer_violations(graph) == []


def test_the_device_side_never_imports_server_only_libraries() -> None:
    modules = project_modules(REPO, ("hw_profiles", "edge_runtime"))
    found = []
    for module, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for name in imported_names(tree, module, path.name == "__init__.py"):
            if name.split(".")[0] in SERVER_ONLY_LIBRARIES:
                found.append(f"{module} imports {name}")
    assert sorted(set(found)) == []


def test_the_cycle_finder_finds_cycles_and_only_cycles() -> None:
    assert find_cycle({}) is None
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None  # a diamond is no cycle
    assert find_cycle({"a": {"a"}}) == ["a", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    # reached through a prefix that is not on the cycle, and a target missing from the keys
    cycle = find_cycle({"a": {"b", "x"}, "b": {"c"}, "c": {"d"}, "d": {"b"}})
    assert cycle == ["b", "c", "d", "b"]


def test_the_graph_follows_every_kind_of_import(tmp_path: Path) -> None:
    """A synthetic project: a circle closed only by a function-level relative import is found."""
    files = {
        "pkg/__init__.py": "from pkg.rules import mean\n",
        "pkg/rules.py": "import numpy as np\n\ndef pick():\n    from .hetero import het\n    return het\n",
        "pkg/hetero.py": "from . import rules\n",
        "pkg/sub/__init__.py": "",
        "pkg/sub/deep.py": "from ..rules import pick\nimport pkg.hetero as h\nfrom pkg import sub\n",
        "low/__init__.py": "",
        "low/base.py": "from pkg.sub import deep\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    graph = import_graph(tmp_path, ("low", "pkg"))
    assert graph["pkg"] == {"pkg.rules"}
    assert graph["pkg.rules"] == {"pkg.hetero"}
    assert graph["pkg.hetero"] == {"pkg.rules"}
    assert graph["pkg.sub.deep"] == {"pkg.rules", "pkg.hetero", "pkg.sub"}
    assert find_cycle(graph) == ["pkg.hetero", "pkg.rules", "pkg.hetero"]
    assert layer_violations(graph, ("low", "pkg")) == ["low.base -> pkg.sub.deep"]
    # the same project with the lazy import gone has no circle
    (tmp_path / "pkg/rules.py").write_text("def pick():\n    return None\n")
    assert find_cycle(import_graph(tmp_path, ("low", "pkg"))) is None


def oversized(root: Path, package: str, limit: int = MAX_LINES) -> list[str]:
    """Modules of ``package`` longer than ``limit`` lines, generated tables left out."""
    out = []
    for module, path in sorted(project_modules(root, (package,)).items()):
        text = path.read_text(encoding="utf-8")
        doc = ast.get_docstring(ast.parse(text)) or ""
        if GENERATED_MARK in doc.split("\n")[0]:
            continue
        lines = len(text.splitlines())
        if lines > limit:
            out.append(f"{module}: {lines} lines")
    return out


def test_no_module_of_the_aggregation_service_is_over_500_lines() -> None:
    assert oversized(REPO, "broker_server") == []


def test_the_size_check_counts_lines_and_spares_only_generated_tables(tmp_path: Path) -> None:
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("")
    (tmp_path / "pkg" / "small.py").write_text('"""Small."""\n' + "x = 1\n" * 10)
    (tmp_path / "pkg" / "big.py").write_text('"""Big."""\n' + "x = 1\n" * 20)
    (tmp_path / "pkg" / "table.py").write_text('"""A table (generated)."""\n' + "x = 1\n" * 20)
    (tmp_path / "pkg" / "liar.py").write_text('"""Hand-written.\n\nNot (generated)."""\n' + "x = 1\n" * 20)
    assert oversized(tmp_path, "pkg", limit=15) == ["pkg.big: 21 lines", "pkg.liar: 23 lines"]

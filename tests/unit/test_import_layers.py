"""Imports inside ``airi_ray`` point one way: the core at the bottom, the runtime (its call
``Backend`` included) and the ingress on top of it, the Python client above those, the app's
lifecycle (``airi_ray.app``) and the CLI at the top.

Read from the sources with ``ast``, so nothing is imported (no Ray). What the core may
import from outside the package is ``test_core_pure``'s concern; here, only what modules
of the package import from each other.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "airi_ray"

# Users of the public API, or the top the client sits under.
CLIENT_IMPORTERS = ("airi_ray/__init__.py", "airi_ray/app.py", "airi_ray/cli.py", "airi_ray/demo/")
APP_IMPORTERS = ("airi_ray/__init__.py", "airi_ray/cli.py", "airi_ray/demo/")


@dataclass(frozen=True)
class Import:
    module: str  # the module imported (for ``from a import b``: a, and a.b if a module)
    line: int
    at_top: bool  # run when the module is imported (not inside a function)


def _name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_module(name: str) -> bool:
    base = ROOT.joinpath(*name.split("."))
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def _resolve(path: Path, node: ast.ImportFrom) -> str:
    """The absolute module name of a ``from ... import`` (relative ones included)."""
    if not node.level:
        return node.module or ""
    package = _name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    base = package[: len(package) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def _sources() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


@cache
def imports_of(path: Path) -> tuple[Import, ...]:
    """Every ``airi_ray`` module ``path`` imports, with where the import runs."""
    found: list[Import] = []

    def visit(node: ast.AST, at_top: bool) -> None:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            at_top = False
        if isinstance(node, ast.Import):
            found.extend(Import(a.name, node.lineno, at_top) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(path, node)
            found.append(Import(base, node.lineno, at_top))
            for a in node.names:
                if _is_module(f"{base}.{a.name}"):
                    found.append(Import(f"{base}.{a.name}", node.lineno, at_top))
        for child in ast.iter_child_nodes(node):
            visit(child, at_top)

    visit(ast.parse(path.read_text(), str(path)), True)
    return tuple(i for i in found if i.module == "airi_ray" or i.module.startswith("airi_ray."))


def _where(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def _of(imported: str, module: str) -> bool:
    return imported == module or imported.startswith(module + ".")


def _importers(module: str) -> list[tuple[str, Import]]:
    return [
        (_where(p), i)
        for p in _sources()
        if _name(p) != module
        for i in imports_of(p)
        if _of(i.module, module)
    ]


def test_the_sources_are_found_and_read() -> None:
    names = {_name(p) for p in _sources()}
    assert {"airi_ray.client", "airi_ray.app", "airi_ray.runtime.backend"} <= names
    assert any(_of(i.module, "airi_ray.client") for i in imports_of(PACKAGE / "app.py"))


def test_only_the_top_imports_the_client() -> None:
    bad = [
        f"{where}:{i.line} imports {i.module}"
        for where, i in _importers("airi_ray.client")
        if not where.startswith(CLIENT_IMPORTERS)
    ]
    assert bad == [], "the ingress, graphs and the runtime call the Backend, not the client"


def test_only_the_cli_and_the_demo_import_the_app() -> None:
    bad = [
        f"{where}:{i.line} imports {i.module}"
        for where, i in _importers("airi_ray.app")
        if not where.startswith(APP_IMPORTERS)
    ]
    assert bad == []


@pytest.mark.parametrize("layer", ["runtime", "serve"])
def test_runtime_and_serve_never_import_upwards(layer: str) -> None:
    bad = [
        f"{_where(p)}:{i.line} imports {i.module}"
        for p in sorted((PACKAGE / layer).rglob("*.py"))
        for i in imports_of(p)
        if any(_of(i.module, top) for top in ("airi_ray.client", "airi_ray.app", "airi_ray.cli"))
    ]
    assert bad == []


def test_core_imports_only_the_core() -> None:
    bad = [
        f"{_where(p)}:{i.line} imports {i.module}"
        for p in sorted((PACKAGE / "core").rglob("*.py"))
        for i in imports_of(p)
        if not _of(i.module, "airi_ray.core")
    ]
    assert bad == []


def test_module_level_imports_have_no_cycle() -> None:
    """Importing any module never needs one that (at its top) needs the first again;
    the imports inside functions are left out (they run after both are loaded)."""
    graph: dict[str, set[str]] = {}
    for p in _sources():
        deps = {i.module for i in imports_of(p) if i.at_top and _is_module(i.module)}
        graph[_name(p)] = deps - {_name(p)}
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def walk(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for d in sorted(graph.get(m, ())):
            if state.get(d) == 1:
                return path[path.index(d) :] + [d]
            if d not in state and (cycle := walk(d)) is not None:
                return cycle
        path.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (cycle := walk(m)) is not None:
            pytest.fail("import cycle: " + " -> ".join(cycle))


def _defines(path: Path, name: str) -> bool:
    tree = ast.parse(path.read_text(), str(path))
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            if node.name == name:
                return True
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            if any((a.asname or a.name.split(".")[0]) == name for a in node.names):
                return True
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(isinstance(t, ast.Name) and t.id == name for t in targets):
                return True
    return False


def test_the_lazy_exports_name_modules_that_define_them() -> None:
    """``airi_ray.__init__`` loads its public names by module path: each must be there."""
    tree = ast.parse((PACKAGE / "__init__.py").read_text())
    [table] = [
        n.value
        for n in tree.body
        if isinstance(n, ast.Assign)
        and any(isinstance(t, ast.Name) and t.id == "_EXPORTS" for t in n.targets)
    ]
    exports = ast.literal_eval(table)
    assert exports["deploy"] == exports["connect"] == exports["shutdown"] == "airi_ray.app"
    missing = []
    for name, module in exports.items():
        base = ROOT.joinpath(*module.split("."))
        path = (
            base.with_suffix(".py") if base.with_suffix(".py").is_file() else base / "__init__.py"
        )
        if not path.is_file() or not _defines(path, name):
            missing.append(f"{name} in {module}")
    assert missing == []


# Not a circle (nothing below imports the app), but the ingress loads vLLM's protocol models
# (importing it takes seconds): ``deploy`` loads it only for an app that has an ingress, so
# ``airi.connect()`` stays quick.
HEAVY_LOCAL_IMPORTS = {("airi_ray/app.py", "airi_ray.serve.ingress")}


def test_no_airi_ray_import_inside_a_function() -> None:
    """A function-local import that hides a circle is a circle: outside the CLI (which
    loads each command's modules only when it runs), every ``airi_ray`` import is at the
    top of its module. A lazy import of a heavy third-party library stays allowed."""
    bad = [
        f"{_where(p)}:{i.line} imports {i.module}"
        for p in _sources()
        if _where(p) != "airi_ray/cli.py"
        for i in imports_of(p)
        if not i.at_top and (_where(p), i.module) not in HEAVY_LOCAL_IMPORTS
    ]
    assert bad == []

"""No import circle anywhere in ``bitplan/``: the modules form a layered graph.

Every ``import`` and ``from ... import`` counts, at module level and inside functions (a lazy
import is still a dependency), except under ``if TYPE_CHECKING:`` (annotations only).
``from pkg import name`` where ``name`` is a submodule is an import of ``pkg.name``; importing
``a.b.c`` is an edge to ``a.b.c`` only, not to its parent packages.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parent.parent / "bitplan"


def module_files(root: Path = PACKAGE_ROOT) -> dict[str, Path]:
    """Module name -> file, for every module of the package at ``root``."""
    modules = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _import_nodes(node: ast.AST):
    """Every import statement under ``node``, skipping ``if TYPE_CHECKING:`` bodies."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            yield child
        elif isinstance(child, ast.If) and _is_type_checking(child.test):
            for other in child.orelse:
                yield from _import_nodes(ast.Module(body=[other], type_ignores=[]))
        else:
            yield from _import_nodes(child)


def imported_modules(module: str, source: str, is_package: bool, known: set[str]) -> set[str]:
    """The modules of ``known`` that ``source`` (the text of ``module``) imports."""
    found = set()
    for node in _import_nodes(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
            continue
        if node.level:  # relative: from the module's own package (or the package itself)
            package = module if is_package else module.rpartition(".")[0]
            for _ in range(node.level - 1):
                package = package.rpartition(".")[0]
            base = f"{package}.{node.module}" if node.module else package
        else:
            base = node.module
        for alias in node.names:
            submodule = f"{base}.{alias.name}"
            found.add(submodule if submodule in known else base)
    return {name for name in found if name in known and name != module}


def import_graph(root: Path = PACKAGE_ROOT) -> dict[str, set[str]]:
    files = module_files(root)
    known = set(files)
    return {
        module: imported_modules(module, path.read_text(), path.name == "__init__.py", known)
        for module, path in files.items()
    }


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as [a, b, ..., a], or None."""
    state: dict[str, str] = {}  # "open" while on the current path, "done" once explored
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        path.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == "open":
                return path[path.index(target) :] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        path.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_bitplan_has_no_import_cycle():
    graph = import_graph()
    assert "bitplan.exporters.writer" in graph and "bitplan.model.open" in graph
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_export_imports_nothing_from_model():
    # Back ends take an ExportSource; opening bitplan's exports is bitplan/model/open.py's job.
    graph = import_graph()
    offending = {
        (module, target)
        for module, targets in graph.items()
        if module.startswith("bitplan.exporters")
        for target in targets
        if target.startswith("bitplan.model")
    }
    assert not offending, sorted(offending)


def test_the_walker_sees_lazy_submodule_and_relative_imports_but_not_type_checking():
    known = {"p", "p.a", "p.b", "p.c", "p.d", "p.e"}
    source = """
from typing import TYPE_CHECKING
import p.b
from p import c
from . import d as renamed
if TYPE_CHECKING:
    from p import e
def later():
    from p.e import thing
"""
    assert imported_modules("p.a", source, False, known) == {"p.b", "p.c", "p.d", "p.e"}
    only_typing = "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import p.b\n"
    assert imported_modules("p.a", only_typing, False, known) == set()
    assert imported_modules("p", "from p import thing\n", True, known) == set()  # itself
    assert imported_modules("p.a", "from p import thing\n", False, known) == {"p"}


def test_find_cycle_reports_the_circle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_every_module_imports_first():
    """The walker above sees imports, not that Python runs a package's ``__init__`` before any of
    its modules: import every module first thing (bitplan's modules forgotten between imports,
    third-party ones kept, so it is quick), as a user's script would."""
    import subprocess
    import sys

    code = (
        "import importlib, sys\n"
        "for name in sys.argv[1:]:\n"
        "    for loaded in [m for m in sys.modules if m == 'bitplan' or m.startswith('bitplan.')]:\n"
        "        del sys.modules[loaded]\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except ImportError as err:\n"
        "        print(name, err)\n"
    )
    names = [name for name in module_files() if not name.endswith("__main__")]
    result = subprocess.run(
        [sys.executable, "-c", code, *names], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "", result.stdout

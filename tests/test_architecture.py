"""The package structure: no import circle, no import hidden in a function, and the optimized path
asks reference/ only for semantics, never for its dense math (attention-gym's rule)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("reference", "optimized")
# What optimized/ may import from reference/: configurations, layouts, lattices, merges, schedules.
SEMANTICS_MODULES = {
    "reference.config",
    "reference.semantics",
    "reference.inputs",
    "reference.merge",
    "reference.ring_schedule",
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, ast.Module]:
    return {
        _module_name(path): ast.parse(path.read_text(), str(path))
        for package in PACKAGES
        for path in sorted((ROOT / package).rglob("*.py"))
    }


def _resolve(module: str, node: ast.ImportFrom, is_package: bool) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(module: str, tree: ast.Module, known: set[str], top_level_only: bool) -> set[str]:
    """Project modules ``module`` imports (``from x import y`` counts y when y is a module)."""
    is_package = (ROOT / module.replace(".", "/") / "__init__.py").exists()
    nodes = tree.body if top_level_only else ast.walk(tree)
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(module, node, is_package)
            found.add(target)
            found |= {f"{target}.{alias.name}" for alias in node.names}
        elif isinstance(node, ast.Try) and top_level_only:  # optional imports at module level
            found |= _imports(module, ast.Module(body=node.body, type_ignores=[]), known, True)
    return {name for name in found if name in known and name != module}


def _graph() -> dict[str, set[str]]:
    trees = _modules()
    known = set(trees)
    # A package's __init__ re-exports; an import of a submodule implies its package's __init__ runs
    # first, but the __init__ importing its own submodules is no circle, so edges into a package
    # from its own submodules are left out.
    graph = {}
    for name, tree in trees.items():
        edges = _imports(name, tree, known, top_level_only=False)
        graph[name] = {e for e in edges if not name.startswith(e + ".")}
    return graph


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return stack[stack.index(target) :] + [target]
            if target not in state:
                found = visit(target)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_the_import_graph_has_no_cycle():
    cycle = _find_cycle(_graph())
    assert cycle is None, f"import circle: {' -> '.join(cycle)}"


def test_the_cycle_finder_sees_a_planted_cycle():
    graph = _graph()
    graph["optimized.plan"] = graph["optimized.plan"] | {"optimized.module"}
    assert _find_cycle(graph) is not None


@pytest.mark.parametrize("package", PACKAGES)
def test_no_project_import_inside_a_function(package):
    trees = _modules()
    known = set(trees)
    hidden = []
    for name, tree in trees.items():
        if not name.startswith(package):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                inner = ast.Module(body=node.body, type_ignores=[])
                if _imports(name, inner, known, top_level_only=False):
                    hidden.append(f"{name}.{node.name}")
    assert not hidden, f"project imports inside functions (dodging a circle?): {hidden}"


def test_optimized_asks_reference_only_for_semantics():
    trees = _modules()
    known = set(trees)
    for name, tree in trees.items():
        if not name.startswith("optimized"):
            continue
        used = {m for m in _imports(name, tree, known, top_level_only=False) if m.startswith("reference")}
        assert used <= SEMANTICS_MODULES, (
            f"{name} imports {sorted(used - SEMANTICS_MODULES)} from reference/: only its semantics modules "
            f"{sorted(SEMANTICS_MODULES)} may be used by the optimized path"
        )


def test_the_module_does_not_reach_into_the_ring_or_graphs_through_itself():
    """The ring and the graph cache receive what they need: they import neither the module nor each other."""
    graph = _graph()
    for name in ("optimized.ring", "optimized.graphs", "optimized.dispatch"):
        assert "optimized.module" not in graph[name], f"{name} imports optimized.module"
    assert "optimized.ring" not in graph["optimized.graphs"] and "optimized.graphs" not in graph["optimized.ring"]

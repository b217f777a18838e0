"""The package's modules import each other without cycles, so any module can be imported first, in any order.

Checked on the source: every ``import`` of a ``lightning_peft`` module, at any depth (a function-level import is a
cycle deferred, not removed), except those under ``if TYPE_CHECKING:``. Importing a module runs its parent
packages' ``__init__`` first, which Python handles; a module that itself imports a package whose ``__init__`` imports
that module is a cycle and is counted.
"""

from __future__ import annotations

import ast
from pathlib import Path

import lightning_peft

ROOT = Path(lightning_peft.__file__).parent
PACKAGE = ROOT.name


def _module_name(path: Path) -> str:
    parts = [PACKAGE, *path.relative_to(ROOT).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    tree = ast.parse(path.read_text())
    skipped = {id(node) for stmt in ast.walk(tree) if isinstance(stmt, ast.If) and "TYPE_CHECKING" in ast.unparse(
        stmt.test) for block in stmt.body for node in ast.walk(block)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)  # ``from pkg import module``
    return {name for name in found if name in modules}


def import_graph() -> dict[str, set[str]]:
    paths = {_module_name(p): p for p in ROOT.rglob("*.py")}
    modules = set(paths)
    return {name: _imports(path, modules) - {name} for name, path in paths.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first = last), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                return stack[stack.index(dep):] + [dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_package_modules_import_without_cycles():
    graph = import_graph()
    assert len(graph) > 20 and f"{PACKAGE}.methods.lora" in graph
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_cycle_finder_finds_a_function_level_cycle(tmp_path):
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    module = tmp_path / "m.py"
    module.write_text(f"def f():\n    from {PACKAGE}.methods import lora\n")
    assert _imports(module, {f"{PACKAGE}.methods", f"{PACKAGE}.methods.lora"}) == {f"{PACKAGE}.methods",
                                                                                     f"{PACKAGE}.methods.lora"}

"""The package's import structure: no cycles, and nothing imports back up from the library into a command.

    python tests/test_structure.py      # prints each module's imports and level, the number of levels and cycles

A module's level is 0 when it imports nothing of the package, else one more than the highest level it imports.
Only imports written in the source count (`cli.py` starts commands by name, at run time)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "mlx_dlm"
# Modules with a command-line main that no library module may import (chat takes generate's flags, train uploads).
COMMANDS = {"train", "generate", "chat", "server", "export", "upload", "cli", "__main__"}
MAY_IMPORT_COMMANDS = {"chat": {"generate"}, "__main__": {"cli"}, "train": {"upload"}}


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """Module name -> the package's modules it imports (relative, or as mlx_dlm.X)."""
    modules = {path.stem for path in package.glob("*.py")}
    graph = {}
    for name in modules:
        deps = set()
        for node in ast.walk(ast.parse((package / f"{name}.py").read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                deps.update([node.module.split(".")[0]] if node.module else [a.name for a in node.names])
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("mlx_dlm."):
                deps.add(node.module.split(".")[1])
        graph[name] = (deps & modules) - {name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every cycle found by depth-first search, each as the path that closes it."""
    found, state = [], {}

    def visit(node, path):
        state[node] = "open"
        for dep in sorted(graph[node]):
            if state.get(dep) == "open":
                found.append(path[path.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, path + [dep])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return found


def levels(graph: dict[str, set[str]]) -> dict[str, int]:
    """Each module's level (the graph must have no cycles)."""
    memo: dict[str, int] = {}

    def level(node):
        if node not in memo:
            memo[node] = 1 + max((level(d) for d in graph[node]), default=-1)
        return memo[node]

    return {node: level(node) for node in graph}


def test_the_package_has_no_import_cycles():
    assert cycles(import_graph()) == []


def test_cycles_and_levels_on_a_known_graph():
    graph = {"a": {"b"}, "b": {"c"}, "c": set(), "d": {"a", "c"}}
    assert levels(graph) == {"c": 0, "b": 1, "a": 2, "d": 3} and cycles(graph) == []
    assert cycles({"a": {"b"}, "b": {"a"}}) == [["a", "b", "a"]]


def test_no_library_module_imports_a_command():
    graph = import_graph()
    wrong = {name: sorted(deps & COMMANDS - MAY_IMPORT_COMMANDS.get(name, set()))
             for name, deps in graph.items()}
    assert {name: deps for name, deps in wrong.items() if deps} == {}


def test_private_names_are_not_imported_across_modules():
    """A module imports another's public names only (`eval` once reached for `sample._memo`)."""
    private = []
    for path in PACKAGE.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.level == 1 or (node.module or "").startswith("mlx_dlm")):
                private += [f"{path.stem}: {a.name}" for a in node.names if a.name.startswith("_")]
    assert private == []


if __name__ == "__main__":
    graph = import_graph()
    found = cycles(graph)
    by_level = levels(graph) if not found else {}
    for name in sorted(graph, key=lambda n: (by_level.get(n, 0), n)):
        print(f"{by_level.get(name, '?')!s:>2}  {name:<10} -> {', '.join(sorted(graph[name])) or '-'}")
    print(f"{len(graph)} files, {max(by_level.values()) + 1 if by_level else '?'} import levels, {len(found)} cycles")

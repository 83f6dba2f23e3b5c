"""The package layout: no import cycles between secateur's modules (a package counts as its __init__)."""

import ast
from pathlib import Path

import secateur

ROOT = Path(secateur.__file__).parent


def imports() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for file in ROOT.rglob("*.py"):
        module = ".".join(("secateur", *file.relative_to(ROOT).with_suffix("").parts)).removesuffix(".__init__")
        graph[module] = {node.module for node in ast.walk(ast.parse(file.read_text()))
                         if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("secateur")}
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    cycles, done = [], set()

    def visit(module: str, path: list[str]) -> None:
        if module in path:
            cycles.append(path[path.index(module):] + [module])
        elif module not in done:
            for target in sorted(graph.get(module, ())):
                visit(target, path + [module])
            done.add(module)

    for module in sorted(graph):
        visit(module, [])
    return cycles


def test_no_import_cycles():
    graph = imports()
    assert "secateur.sparsity.methods" in graph["secateur.sparsity.engine"]  # the edges are read
    assert find_cycles(graph) == []


def test_the_cycle_finder_finds_cycles():
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]

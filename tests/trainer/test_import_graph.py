"""The trainer's modules import one another without a cycle (issue 19: recipe, preference,
console and launch had come to import each other in a circle). Read from the source with
`ast`, so imports inside functions and under TYPE_CHECKING count as well: a lazy import hides
a cycle from Python, not from a reader."""

from __future__ import annotations

import ast
from pathlib import Path

from support.jobs import ROOT

PACKAGE = "kubetune_trainer"
SOURCE = ROOT / "trainer_image" / PACKAGE


def imported_modules(path: Path, modules: set[str]) -> set[str]:
    """The package's modules that `path` imports, anywhere in the file."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            # `from kubetune_trainer import recipe` imports the module recipe.
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == PACKAGE and len(parts) > 1 and parts[1] in modules:
                found.add(parts[1])
    return found


def import_graph(source: Path) -> dict[str, set[str]]:
    modules = {p.stem for p in source.glob("*.py") if p.stem != "__init__"}
    return {m: imported_modules(source / f"{m}.py", modules) - {m} for m in sorted(modules)}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None (depth-first search, three colours)."""
    done: set[str] = set()
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        if node in path:
            return [*path[path.index(node):], node]
        if node in done:
            return None
        path.append(node)
        for target in sorted(graph.get(node, ())):
            cycle = visit(target)
            if cycle:
                return cycle
        path.pop()
        done.add(node)
        return None

    for start in sorted(graph):
        cycle = visit(start)
        if cycle:
            return cycle
    return None


def test_the_trainer_modules_import_each_other_without_a_cycle() -> None:
    graph = import_graph(SOURCE)
    assert {"recipe", "objectives", "sft", "preference", "console", "launch"} <= graph.keys()
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_recipe_reaches_the_objectives_through_one_seam() -> None:
    """As the methods have factories.py: the recipe imports objectives, never sft or
    preference, and those take their shared types from below (prepared, trainers)."""
    graph = import_graph(SOURCE)
    assert "objectives" in graph["recipe"]
    assert not {"sft", "preference"} & graph["recipe"]
    for objective in ("sft", "preference"):
        assert "recipe" not in graph[objective]
        assert {"prepared", "trainers"} <= graph[objective]


def test_the_cycle_finder_sees_lazy_and_type_checking_imports(tmp_path: Path) -> None:
    (tmp_path / "a.py").write_text("def f():\n    from kubetune_trainer import b\n")
    (tmp_path / "b.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                                   "    from kubetune_trainer.c import X\n")
    (tmp_path / "c.py").write_text("import kubetune_trainer.a\n")
    assert find_cycle(import_graph(tmp_path)) == ["a", "b", "c", "a"]
    (tmp_path / "c.py").write_text("import os\n")
    assert find_cycle(import_graph(tmp_path)) is None

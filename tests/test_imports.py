"""The import direction (see docs/development.md, Layout): the leaf and library modules never import a
stage module, and no module imports itself through others (function-level imports count)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "pipeline"
#: the modules a user runs: the stage modules and what drives them (pipeline.stages is the table
#: of stages, a leaf that imports them lazily by name)
TOP = {
    "pipeline.train",
    "pipeline.sample",
    "pipeline.evaluate",
    "pipeline.cli",
    "pipeline.timings",
    "pipeline.dispatch",
    "pipeline.plan",
    "pipeline.api",
    "pipeline.export",
    "pipeline.doctor",
    "pipeline.__main__",
}


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports() -> dict[str, set[str]]:
    """Module -> the pipeline modules it imports anywhere in its body."""
    names = {module_name(p) for p in PKG.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for path in PKG.rglob("*.py"):
        me = module_name(path)
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pipeline"):
                deps.add(node.module)
                deps.update(f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in names)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name.startswith("pipeline"))
        graph[me] = {d for d in deps if d in names and d != me}
    return graph


def test_library_modules_never_import_a_stage_module():
    graph = imports()
    offenders = {m: sorted(d & TOP) for m, d in graph.items() if m not in TOP and d & TOP}
    assert not offenders, offenders


def test_no_import_cycle():
    graph = imports()
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        path.append(m)
        for d in sorted(graph.get(m, ())):
            if d == "pipeline":
                continue
            if state.get(d) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(d) :] + [d]))
            if d not in state:
                visit(d)
        path.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)

"""The package's rooms: who may import whom (README, Layout), read from the source with ast.

Every import is counted, function-local ones included, so an import hidden inside a function cannot
hide a dependency or a cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "ggml_probe"

# What each room must never import (the engine is llama.cpp only; analyses are pure NumPy).
FORBIDDEN = {
    "engine": {"analysis", "attribution", "weights", "pipeline", "report", "tasks", "models", "cli"},
    "analysis": {"engine", "attribution", "weights", "pipeline", "report", "models", "cli"},
    "formats": {"engine", "analysis", "attribution", "weights", "pipeline", "report", "models", "tasks", "cli"},
    "attribution": {"pipeline", "report", "cli"},
    "report": {"pipeline", "engine", "attribution", "cli"},
    "pipeline": {"cli"},
}


def _room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _imports(path: Path, module: str | None = None) -> set[str]:
    """Package modules imported by one file (absolute dotted names), at any depth of the file.
    `module` names the file's dotted module when it lies outside the package (the checker's own test)."""
    here = module.split(".") if module else list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    package = here if here[-1] == "__init__" else here[:-1]
    if package and package[-1] == "__init__":
        package = package[:-1]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("ggml_probe"):
                out.add(target)
                out.update(f"{target}.{a.name}" for a in node.names)  # `from . import x` names a module
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("ggml_probe"))
    return out


def _room_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        room = _room(".".join(rel.parts)) if len(rel.parts) > 1 else ""
        room = room or rel.parts[-1]
        targets = {_room(t) for t in _imports(path)} - {room, "", "__init__"}
        graph.setdefault(room, set()).update(t for t in targets if (PACKAGE / t).exists() or (PACKAGE / f"{t}.py").exists())
    return graph


def test_rooms_import_only_what_they_may():
    graph = _room_graph()
    assert {"engine", "attribution", "pipeline", "report", "analysis"} <= set(graph)
    broken = {room: sorted(graph.get(room, set()) & banned) for room, banned in FORBIDDEN.items()}
    assert not any(broken.values()), broken


def test_room_graph_has_no_cycle():
    graph = _room_graph()
    seen, on_path, cycles = set(), [], []

    def visit(room: str) -> None:
        if room in on_path:
            cycles.append(on_path[on_path.index(room):] + [room])
            return
        if room in seen:
            return
        seen.add(room)
        on_path.append(room)
        for nxt in sorted(graph.get(room, ())):
            visit(nxt)
        on_path.pop()

    for room in sorted(graph):
        visit(room)
    assert not cycles, cycles


def test_the_checker_sees_function_local_imports(tmp_path):
    # The walker must count an import inside a function, or it would miss the hidden cycles it guards against.
    assert "ggml_probe.formats.gguf" in _imports(PACKAGE / "engine" / "model.py")  # a top-level import there
    path = tmp_path / "probe.py"
    path.write_text("import os\n\ndef f():\n    if os:\n        from ..analysis import neurons\n")
    found = _imports(path, "ggml_probe.engine.probe")
    assert {"ggml_probe.analysis", "ggml_probe.analysis.neurons"} <= found

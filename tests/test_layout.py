"""The package layout: imports among ``mpistyle`` modules run one way (no cycle, lower layers never look up).

Every import statement counts, those inside functions too (read with ``ast``, nothing is imported). An
``import``/``from`` of a package is an edge to its ``__init__`` (which may re-export names from its own
modules: those are edges of the ``__init__``); ``from package import module`` is an edge to that module.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "mpistyle"

# Lower layers, and what they must never import (the layers above them).
LOWER = ("mpistyle.io", "mpistyle.temporal", "mpistyle.training")
UPPER = ("mpistyle.stylize", "mpistyle.cli", "mpistyle.bench", "mpistyle.report", "mpistyle.metrics")
VIDEO_FILES = ("mpistyle.io.ffmpeg", "mpistyle.io.probe", "mpistyle.io.decode", "mpistyle.io.encode")


def module_name(path: Path, root: Path = PACKAGE) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules(root: Path = PACKAGE) -> dict[str, Path]:
    return {module_name(p, root): p for p in sorted(root.rglob("*.py"))}


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def import_graph(found: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the ``mpistyle`` modules it imports (anywhere in its code)."""

    def known(dotted: str) -> str | None:  # the module itself, or the nearest package above it we have
        parts = dotted.split(".")
        while parts:
            if ".".join(parts) in found:
                return ".".join(parts)
            parts.pop()
        return None

    graph: dict[str, set[str]] = {}
    for name, path in found.items():
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        edges: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names if _within(a.name, "mpistyle")]
                edges |= {t for t in map(known, targets) if t}
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package[:len(package) - node.level + 1]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                if not _within(source, "mpistyle"):
                    continue
                for alias in node.names:
                    sub = f"{source}.{alias.name}"
                    target = sub if sub in found else known(source)  # a module, or a name of a module/package
                    if target:
                        edges.add(target)
        edges.discard(name)
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a path (first module repeated at the end), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state:
            cycle = visit(start)
            if cycle:
                return cycle
    return None


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return import_graph(modules())


def test_the_module_import_graph_has_no_cycle(graph: dict[str, set[str]]) -> None:
    assert {"mpistyle.io.media", "mpistyle.temporal.chains", "mpistyle.training.train"} <= set(graph)
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_lower_layers_never_import_upper_ones(graph: dict[str, set[str]]) -> None:
    for name, edges in graph.items():
        if any(_within(name, low) for low in LOWER):
            up = sorted(e for e in edges if any(_within(e, u) for u in UPPER))
            assert not up, f"{name} imports {up}"


def test_io_and_temporal_run_one_way(graph: dict[str, set[str]]) -> None:
    # Only the dispatchers know both a video file and an image sequence.
    for name in VIDEO_FILES:
        assert "mpistyle.io.sequence" not in graph[name], name
        assert "mpistyle.io.media" not in graph[name], name
    assert not graph["mpistyle.io.sequence"] & {*VIDEO_FILES, "mpistyle.io.media"}
    assert {"mpistyle.io.sequence", "mpistyle.io.decode", "mpistyle.io.encode"} <= graph["mpistyle.io.media"]
    # The recursion builds on the kernels, never the other way.
    assert "mpistyle.temporal.kernels" in graph["mpistyle.temporal.chains"]
    for name in ("mpistyle.temporal.kernels", "mpistyle.temporal.kernels_torch", "mpistyle.temporal.flow"):
        assert "mpistyle.temporal.chains" not in graph[name], name


def test_networks_files_and_engine_each_have_a_module(graph: dict[str, set[str]]) -> None:
    """nets (definitions) at the bottom; models (files) and engine (running them) build on it, not on each other."""
    assert graph["mpistyle.nets"] <= {"mpistyle.errors"}
    assert "mpistyle.nets" in graph["mpistyle.models"] and "mpistyle.engine" not in graph["mpistyle.models"]
    assert "mpistyle.nets" in graph["mpistyle.engine"] and "mpistyle.models" not in graph["mpistyle.engine"]
    for name, edges in graph.items():  # the stylize run and the bench reach the inference engine, not the nets
        if _within(name, "mpistyle.stylize") or _within(name, "mpistyle.bench"):
            assert "mpistyle.nets" not in edges or name == "mpistyle.bench.measure", name


def test_the_check_finds_cycles(tmp_path: Path) -> None:
    """The checker itself: a re-export in a package ``__init__`` that closes a loop is a cycle."""
    pkg = tmp_path / "mpistyle"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from .b import B\n")
    (pkg / "sub" / "a.py").write_text("def f():\n    from mpistyle.sub import B  # lazy, still an edge\n")
    (pkg / "sub" / "b.py").write_text("from . import a\nB = 1\n")
    found = modules(pkg)
    assert set(found) == {"mpistyle", "mpistyle.sub", "mpistyle.sub.a", "mpistyle.sub.b"}
    g = import_graph(found)
    assert g["mpistyle.sub"] == {"mpistyle.sub.b"} and g["mpistyle.sub.b"] == {"mpistyle.sub.a"}
    assert find_cycle(g) == ["mpistyle.sub", "mpistyle.sub.b", "mpistyle.sub.a", "mpistyle.sub"]
    (pkg / "sub" / "a.py").write_text("def f():\n    from mpistyle.sub.b import B\n")  # no package: still a loop
    assert find_cycle(import_graph(modules(pkg))) == ["mpistyle.sub.b", "mpistyle.sub.a", "mpistyle.sub.b"]
    (pkg / "sub" / "b.py").write_text("B = 1\n")
    assert find_cycle(import_graph(modules(pkg))) is None

"""The three layers point one way (front ends -> pool -> engine), read from every module's imports, lazy ones
included, and no module imports itself round a circle."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("workers", "fiftyone_stllm", "labelstudio_backend")
FRONT_ENDS = ("fiftyone_stllm", "labelstudio_backend")
# What of the pool the front ends may use: the client, the types, the settings and the small shared modules
# (time codes, Label Studio formats and jobs, JSON-lines files).
FRONT_END_MAY_USE = (
    "workers.pool.client",
    "workers.schemas",
    "workers.settings",
    "workers.timecodes",
    "workers.labelstudio",
    "workers.sinks.files",
)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_imports(path: Path) -> set[str]:
    """Every project module ``path`` imports, at any depth of the file (``from a import b`` counts a.b when
    a.b is a module, else a)."""
    tree = ast.parse(path.read_text(), str(path))
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                out.add(sub if sub in MODULES else node.module)
    return {m for m in out if m.split(".")[0] in PACKAGES}


MODULES = {module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
GRAPH = {name: project_imports(path) for name, path in MODULES.items()}


def _within(name: str, prefixes) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def test_the_pool_and_the_engine_never_import_a_front_end():
    bad = {
        m: sorted(i for i in deps if _within(i, FRONT_ENDS))
        for m, deps in GRAPH.items()
        if _within(m, ["workers"])
    }
    assert {m: d for m, d in bad.items() if d} == {}


def test_front_ends_use_only_the_client_the_schemas_and_the_shared_helpers():
    bad = {
        m: sorted(i for i in deps if _within(i, ["workers"]) and not _within(i, FRONT_END_MAY_USE))
        for m, deps in GRAPH.items()
        if _within(m, FRONT_ENDS)
    }
    assert {m: d for m, d in bad.items() if d} == {}


def test_the_engine_imports_nothing_of_the_project_outside_itself():
    bad = {
        m: sorted(i for i in deps if not _within(i, ["workers.stllm"]))
        for m, deps in GRAPH.items()
        if _within(m, ["workers.stllm"])
    }
    assert {m: d for m, d in bad.items() if d} == {}


def test_no_module_imports_itself_round_a_circle():
    """Depth-first search for a cycle; a package's ``__init__`` importing its own submodules is no circle
    when they do not import it back."""
    state: dict[str, int] = {}
    cycles = []

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for d in sorted(GRAPH.get(m, ())):
            if d == m or d not in GRAPH:
                continue
            if state.get(d) == 1:
                cycles.append(stack[stack.index(d) :] + [d])
            elif d not in state:
                visit(d, stack + [d])
        state[m] = 2

    for m in sorted(GRAPH):
        if m not in state:
            visit(m, [m])
    assert cycles == []


def test_the_rules_see_the_imports_they_check():
    """The reader finds lazy imports inside functions (so the rules above are not vacuous)."""
    assert "workers.pool.tasks" in GRAPH["workers.pool.client"]  # imported inside submit_*
    assert "workers.pool.client" in GRAPH["fiftyone_stllm"]

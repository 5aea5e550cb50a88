"""The layout rules of docs/architecture.md, checked on the source: who may import whom, no cycles,
and every name a node kind's key ignores is a field its config declares."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return "slimmoe." + ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Absolute names of the slimmoe modules a file imports (anywhere in it, also inside functions)."""
    here = _module_name(path)
    package = here if path.name == "__init__.py" else here.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("slimmoe.")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.startswith("slimmoe."):
                out.add(mod)
                out |= {f"{mod}.{a.name}" for a in node.names}  # `from pkg import module`
    return out


def _graph() -> tuple[dict[str, set[str]], dict[str, Path]]:
    files = {_module_name(p): p for p in (ROOT / "tasks").rglob("*.py")}
    return {m: {i for i in _imports(p) if i in files and i != m} for m, p in files.items()}, files


def test_nodes_never_import_nodes_and_components_never_import_nodes():
    graph, _ = _graph()
    bad = [(m, i) for m, deps in graph.items() for i in deps
           if i.startswith("slimmoe.tasks.nodes.") and i != "slimmoe.tasks.nodes"]
    assert not bad, bad


def test_tasks_never_import_workflows():
    _, files = _graph()
    bad = [(m, i) for m, p in files.items() for i in _imports(p) if i.startswith("slimmoe.workflows")]
    assert not bad, bad


def test_no_import_cycles_inside_tasks():
    graph, _ = _graph()
    state: dict[str, int] = {}

    def visit(m: str, stack: list[str]):
        state[m] = 1
        for d in graph[m]:
            if state.get(d) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(d):] + [d]))
            if d not in state:
                visit(d, stack + [d])
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m, [m])


def test_every_key_ignored_name_is_a_declared_field():
    from slimmoe.workflows import nodes

    kinds = dict(nodes._REGISTRY)
    assert {"pretrain_teacher", "tokenize", "teacher_logits", "stage", "evaluate", "trim", "quantize"} <= set(kinds)
    for kind in kinds.values():
        undeclared = set(kind.key_ignore) - set(kind.config_class.model_fields)
        assert not undeclared, f"{kind.name}: key_ignore names {sorted(undeclared)}, not fields of {kind.config_class}"

"""Tier 1: the package's shape (issue 18). Imports are read from the source (module level and inside
functions alike: a function-local import still ties two modules): no import circle between modules,
and the pure modules (plans, topology, cost model, simulator, scheduler) import neither the runtime
nor the config loader, so they can be used and tested on their own."""

import ast
from pathlib import Path
from typing import Dict, List, Set

ROOT = Path(__file__).resolve().parents[1]
PURE = ("skippipe.plan", "skippipe.topology", "skippipe.cost", "skippipe.simulate", "skippipe.schedule")
FORBIDDEN_FOR_PURE = ("skippipe.runtime", "skippipe.config", "skippipe.commands", "skippipe.train")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> Dict[str, Set[str]]:
    """skippipe module -> the skippipe modules it imports (a package counts as its ``__init__``)."""
    paths = {module_name(p): p for p in (ROOT / "skippipe").rglob("*.py")}
    graph: Dict[str, Set[str]] = {}
    for name, path in paths.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps: Set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                deps.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                deps.add(target)
                deps.update(f"{target}.{a.name}" for a in node.names)  # `from pkg import module`
        graph[name] = {d for d in deps if d in paths and d != name}
    return graph


def circles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    out: List[List[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_checks_see_a_circle_and_a_forbidden_import():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert circles({"a": {"b"}, "b": set()}) == []
    graph = import_graph()
    assert "skippipe.schedule.route" in graph["skippipe.planner"] or "skippipe.schedule" in graph["skippipe.planner"]
    assert "skippipe.plan" in graph["skippipe.schedule.params"]  # module-level and local imports are read


def test_no_import_circles_between_modules():
    found = circles(import_graph())
    assert not found, "import circles: " + "; ".join(" -> ".join(c) for c in found)


def test_pure_modules_import_neither_the_runtime_nor_the_config():
    graph = import_graph()
    within = lambda m, prefixes: any(m == p or m.startswith(p + ".") for p in prefixes)  # noqa: E731
    bad = {m: sorted(d for d in deps if within(d, FORBIDDEN_FOR_PURE)) for m, deps in graph.items() if within(m, PURE)}
    assert not {m: d for m, d in bad.items() if d}, bad


MAX_FUNCTION_LINES, MAX_CLASS_LINES = 60, 250  # issue 18: one concern per function and class


def oversized(source: str, where: str = "") -> List[str]:
    """Functions over MAX_FUNCTION_LINES and classes over MAX_CLASS_LINES lines (docstring included)."""
    out = []
    for node in ast.walk(ast.parse(source)):
        limit = (MAX_FUNCTION_LINES if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
                 else MAX_CLASS_LINES if isinstance(node, ast.ClassDef) else None)
        if limit is not None and node.end_lineno - node.lineno + 1 > limit:
            out.append(f"{where}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)")
    return out


def test_the_size_check_sees_a_long_function_and_class():
    long_function = "def f():\n" + "    x = 1\n" * MAX_FUNCTION_LINES
    long_class = "class C:\n" + "    x = 1\n" * MAX_CLASS_LINES
    assert oversized(long_function) == [f":1 f ({MAX_FUNCTION_LINES + 1} lines)"]
    assert oversized(long_class) == [f":1 C ({MAX_CLASS_LINES + 1} lines)"]
    assert oversized("def f():\n" + "    x = 1\n" * (MAX_FUNCTION_LINES - 1)) == []


def test_no_function_over_60_lines_and_no_class_over_250():
    found = [hit for p in sorted((ROOT / "skippipe").rglob("*.py"))
             for hit in oversized(p.read_text(), str(p.relative_to(ROOT)))]
    assert not found, "too long: " + "; ".join(found)

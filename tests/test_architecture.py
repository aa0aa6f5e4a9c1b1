"""The import graph of src/upcycle, read with ast (nothing is imported): no circles, and no arrow from a shared
floor (data, models, ops, training, eval) up to a method (introvert, moe, masks) or to serving.

Every import counts: module level, inside functions (the lazy imports that keep --help fast) and under
TYPE_CHECKING, since each is a dependency a reader has to follow.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
SHARED = ("data", "eval", "models", "ops", "training")
ABOVE = ("introvert", "moe", "masks", "serving")


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """{module: the upcycle modules it imports}; `from pkg import name` points at pkg.name when that is a module."""
    modules = {module_name(p): p for p in sorted((SRC / "upcycle").rglob("*.py"))}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        edges = set()
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from .x import y
                    anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                    base = f"{anchor}.{base}" if base else anchor
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                           for alias in node.names]
            else:
                continue
            edges.update(t for t in targets if t in modules and t != name)
        graph[name] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

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
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def floor(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_the_graph_sees_lazy_and_from_imports():
    graph = import_graph()
    assert "upcycle.moe.layer" in graph["upcycle.moe.collector"]
    assert "upcycle.models.surgery" in graph["upcycle.masks.method.surgery"]
    assert "upcycle.moe.experiment_report" in graph["upcycle.moe.experiment"]  # a function-local import


def test_no_import_circles():
    assert cycles(import_graph()) == []


def test_cycle_finder_finds_a_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_shared_floors_do_not_import_methods_or_serving():
    upward = sorted(f"{module} -> {target}" for module, targets in import_graph().items() if floor(module) in SHARED
                    for target in targets if floor(target) in ABOVE)
    assert upward == []


def test_methods_do_not_import_each_other():
    # Each method stands on the shared floors alone; a concept two methods need belongs on a floor (ops/kmeans.py).
    methods = ("introvert", "moe", "masks")
    across = sorted(f"{module} -> {target}" for module, targets in import_graph().items() if floor(module) in methods
                    for target in targets if floor(target) in methods and floor(target) != floor(module))
    assert across == []


MASKS_ORDER = ("method", "baselines", "experiments")
"""masks/ sub-packages, lowest first: the method on a model, the baselines built from its parts, and the experiments
that run and report both. An arrow may point only down this list."""


def masks_level(module: str) -> int | None:
    """The index in MASKS_ORDER of the masks/ sub-package that holds `module`; None outside them."""
    parts = module.split(".")
    if len(parts) > 2 and parts[1] == "masks" and parts[2] in MASKS_ORDER:
        return MASKS_ORDER.index(parts[2])
    return None


def test_masks_sub_packages_point_down():
    assert [masks_level(f"upcycle.masks.{p}.x") for p in MASKS_ORDER] == [0, 1, 2]
    assert masks_level("upcycle.masks.commands") is None
    upward = sorted(f"{module} -> {target}" for module, targets in import_graph().items()
                    if masks_level(module) is not None for target in targets
                    if masks_level(target) is not None and masks_level(target) > masks_level(module))
    assert upward == []


MAX_FUNCTION_LINES = 60


def long_functions(limit: int = MAX_FUNCTION_LINES) -> list[str]:
    """'path:line name (length)' of each function or method in src/upcycle longer than `limit` lines, counted from
    the def line to its last line (a nested function counts inside the one that holds it, and on its own)."""
    found = []
    for path in sorted((SRC / "upcycle").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = node.end_lineno - node.lineno + 1
                if length > limit:
                    found.append(f"{path.relative_to(SRC)}:{node.lineno} {node.name} ({length})")
    return found


def test_no_function_is_longer_than_sixty_lines():
    # A long function hides a request or training path in one block; split it into helpers with one job each.
    assert long_functions() == []

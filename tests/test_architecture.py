"""The package's shape: imports point down the layers, reports need no torch, no oversized files or functions."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).parent.parent / "src" / "ecoadapt"
MAX_FILE_LINES = 500
MAX_FUNCTION_LINES = 60


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports() -> dict[str, set[str]]:
    """ecoadapt module -> the ecoadapt modules it imports (at any depth of its code)."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("ecoadapt"):
                for alias in node.names:
                    child = f"{node.module}.{alias.name}"
                    deps.add(child if child in modules else node.module)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name.startswith("ecoadapt"))
        graph[name] = {d for d in deps if d in modules and d != name and d != "ecoadapt"}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                return [*path[path.index(dep) :], dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle():
    assert find_cycle(imports()) is None


# The layers, bottom first: a module may import from its own layer and those below, never above.
# A layer is a subpackage of ecoadapt (or, on top, a module); every module belongs to one.
LAYERS = [
    "core",
    "config",
    "results",
    "measure",
    "data",
    "model",
    "train",
    "task",
    "forecast",
    "reports",
    "integrations",
    "commands",
    "api",
    "cli",
    "__main__",
]


def layer_of(module: str) -> int:
    """The index in LAYERS of a module's layer (the package ``ecoadapt`` itself sits on top)."""
    parts = module.split(".")
    if parts == ["ecoadapt"]:
        return len(LAYERS)
    return LAYERS.index(parts[1])


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """Every import that points up a layer, as 'importer -> imported'."""
    return [f"{module} -> {dep}" for module, deps in graph.items() for dep in deps if layer_of(dep) > layer_of(module)]


def test_every_module_has_a_layer():
    unplaced = [m for m in imports() if m != "ecoadapt" and m.split(".")[1] not in LAYERS]
    assert not unplaced, f"add these to a layer (a subpackage named in LAYERS): {unplaced}"


def test_the_layer_check_sees_an_upward_import():
    graph = {"ecoadapt.core.storage": {"ecoadapt.train.loop"}, "ecoadapt.train.loop": {"ecoadapt.core.storage"}}
    assert upward_imports(graph) == ["ecoadapt.core.storage -> ecoadapt.train.loop"]


def test_imports_point_down_the_layers():
    assert upward_imports(imports()) == []


def test_reading_results_needs_no_torch():
    code = "import sys, ecoadapt, ecoadapt.reports.builder, ecoadapt.commands.sweep, ecoadapt.results.summary\n"
    code += "print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_no_oversized_file_or_function():
    too_long = []
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text()
        if text.count("\n") > MAX_FILE_LINES:
            too_long.append(f"{path.name}: {text.count(chr(10))} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = (node.end_lineno or node.lineno) - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    too_long.append(f"{path.name}:{node.lineno} {node.name}: {length} lines")
    assert not too_long

"""The package's shape: imports point down, reports need no torch, no oversized files or functions."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).parent.parent / "src" / "ecoadapt"
MAX_FILE_LINES = 500
MAX_FUNCTION_LINES = 80


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


def test_lower_layers_never_import_the_commands():
    graph = imports()
    commands = {"ecoadapt.cli", "ecoadapt.adapt", "ecoadapt.evaluate", "ecoadapt.sweep", "ecoadapt.demo"}
    lower = ["ecoadapt.train", "ecoadapt.downstream", "ecoadapt.losses", "ecoadapt.config", "ecoadapt.summary"]
    lower += ["ecoadapt.finetune", "ecoadapt.probe", "ecoadapt.task_cache", "ecoadapt.stats", "ecoadapt.verdicts"]
    lower += ["ecoadapt.hub", "ecoadapt.carbon", "ecoadapt.model_card", "ecoadapt.compute_statement"]
    lower += ["ecoadapt.integrations"]
    lower += [m for m in graph if m.startswith(("ecoadapt.measure", "ecoadapt.data"))]
    for module in lower:
        assert not graph[module] & commands, (module, graph[module] & commands)
    assert "ecoadapt.train" not in graph["ecoadapt.measure.budget"]


def test_reading_results_needs_no_torch():
    code = "import sys, ecoadapt.report, ecoadapt.sweep, ecoadapt.summary; print('torch' in sys.modules)"
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

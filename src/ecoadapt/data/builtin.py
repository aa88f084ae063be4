"""Corpora that ship with Python itself, so that presets and the demo run offline.

``builtin:python-docstrings``: the docstrings of the Python standard library's own modules,
classes and functions, read from its source files with :mod:`ast` (nothing is imported). The
domain is technical English about programming, written by the CPython developers; its exact
contents depend on the Python version, which the run's environment records.
"""

from __future__ import annotations

import ast
import sysconfig
from collections.abc import Iterator
from pathlib import Path

from ecoadapt.errors import UserError

PREFIX = "builtin:"
# Packages left out: tests (docstrings of test cases are noise) and vendored/IDE code.
_SKIP_DIRS = {"test", "tests", "idlelib", "lib2to3", "site-packages", "__pycache__", "turtledemo", "ensurepip"}
CORPORA = {"python-docstrings": "docstrings of the Python standard library (read from its source)"}


def check_name(source: str) -> None:
    """Raise a UserError unless ``source`` names a known builtin corpus."""
    name = source[len(PREFIX) :]
    if name not in CORPORA:
        raise UserError(f"data.train: unknown builtin corpus '{name}'; available: {', '.join(CORPORA)}")


def stdlib_files() -> list[Path]:
    """The standard library's .py files, sorted (so the corpus order is deterministic)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.rglob("*.py") if not _SKIP_DIRS.intersection(p.relative_to(root).parts[:-1]))


def documents(source: str) -> Iterator[str]:
    """Yield the documents of a builtin corpus: one docstring each, whitespace normalised."""
    check_name(source)
    for path in stdlib_files():
        try:
            tree = ast.parse(path.read_bytes())
        except (SyntaxError, ValueError):  # a few files are templates or other Pythons' code
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                # Layout whitespace is dropped so that packing sees prose, not indentation.
                doc = " ".join((ast.get_docstring(node) or "").split())
                if len(doc) >= 40:
                    yield doc

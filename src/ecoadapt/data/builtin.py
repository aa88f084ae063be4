"""Corpora and a task that ship with Python itself, so that presets and the demo run offline.

``builtin:python-docstrings``: the docstrings of the Python standard library's own modules,
classes and functions, read from its source files with :mod:`ast` (nothing is imported). The
domain is technical English about programming, written by the CPython developers; its exact
contents depend on the Python version, which the run's environment records.

``builtin:python-docstring-topics``: a labelled task in that domain: which of eight standard
library packages a docstring comes from (asyncio, email, http, importlib, logging,
multiprocessing, unittest, xml), records ``{"text", "label"}``.

``builtin:general-english``: 103 short paragraphs of everyday English (weather, cooking, travel,
history, science, sport, town life; about 22 KB, 4-5 thousand tokens), written for ecoadapt and
shipped with it under its licence: the general text whose loss before and after training shows
what adapting to a domain cost elsewhere (``data.general_eval``). A small sample, not a
benchmark: for a standard one give a general corpus of your own, or ``hf:`` WikiText.
"""

from __future__ import annotations

import ast
import hashlib
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path

from ecoadapt.core.errors import UserError

PREFIX = "builtin:"
# Packages left out: tests (docstrings of test cases are noise) and vendored/IDE code.
_SKIP_DIRS = {"test", "tests", "idlelib", "lib2to3", "site-packages", "__pycache__", "turtledemo", "ensurepip"}
CORPORA = {
    "python-docstrings": "docstrings of the Python standard library (read from its source)",
    "general-english": "a small sample of everyday English written for ecoadapt (103 paragraphs)",
}
TASKS = {"python-docstring-topics": "which standard-library package a docstring comes from (8 labels)"}
TOPICS = ("asyncio", "email", "http", "importlib", "logging", "multiprocessing", "unittest", "xml")


def check_name(source: str, kinds: dict[str, str] = CORPORA, key: str = "data.train") -> None:
    """Raise a UserError unless ``source`` names a known builtin corpus (or task)."""
    name = source[len(PREFIX) :]
    if name not in kinds:
        raise UserError(f"{key}: unknown builtin '{name}'; available: {', '.join(kinds)}")


_SHIPPED = {"general-english": Path(__file__).parent / "text" / "general-english.txt"}  # one document a line


def shipped_file(source: str) -> Path | None:
    """The text file a builtin corpus is read from, when ecoadapt ships it (else None)."""
    return _SHIPPED.get(source[len(PREFIX) :])


def digest(source: str) -> str:
    """What identifies a builtin corpus's contents: the Python version whose standard library it
    reads, or the hash of the text file ecoadapt ships."""
    name = source[len(PREFIX) :]
    if name in _SHIPPED:
        return f"{source}@sha256:{hashlib.sha256(_SHIPPED[name].read_bytes()).hexdigest()}"
    return f"{source}@python{sys.version_info.major}.{sys.version_info.minor}.{sys.version_info.micro}"


def stdlib_files() -> list[Path]:
    """The standard library's .py files, sorted (so the corpus order is deterministic)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.rglob("*.py") if not _SKIP_DIRS.intersection(p.relative_to(root).parts[:-1]))


def _docstrings(paths: list[Path]) -> Iterator[tuple[Path, str]]:
    for path in paths:
        try:
            tree = ast.parse(path.read_bytes())
        except (SyntaxError, ValueError):  # a few files are templates or other Pythons' code
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                # Layout whitespace is dropped so that packing sees prose, not indentation.
                doc = " ".join((ast.get_docstring(node) or "").split())
                if len(doc) >= 40:
                    yield path, doc


def documents(source: str) -> Iterator[str]:
    """Yield the documents of a builtin corpus: one docstring (or shipped line) each, whitespace
    normalised."""
    check_name(source)
    name = source[len(PREFIX) :]
    if name in _SHIPPED:
        with open(_SHIPPED[name], encoding="utf-8") as f:
            yield from (line.strip() for line in f if line.strip())
        return
    for _, doc in _docstrings(stdlib_files()):
        yield doc


def task_records(source: str) -> Iterator[tuple[str, dict[str, str]]]:
    """Yield (where, {"text", "label"}) for a builtin task."""
    check_name(source, TASKS, "task.train")
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [p for p in stdlib_files() if p.relative_to(root).parts[0] in TOPICS]
    for path, doc in _docstrings(files):
        yield f"{path}", {"text": doc, "label": path.relative_to(root).parts[0]}

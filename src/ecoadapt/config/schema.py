"""Dataclasses as schemas: field docstrings as help, type-checked construction from plain data.

The run config, the sweep file and the run summary are each a tree of dataclasses whose fields
carry a docstring (the string literal under the field). This module reads those docstrings
(the single source of help text: ``ecoadapt keys`` prints them), names types for humans, and
builds a dataclass from YAML/JSON data, checking every value against its annotation and naming
the key and what it takes when one does not fit.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import difflib
import inspect
import itertools
import math
import types
import typing
from functools import cache
from typing import Any, Literal

from ecoadapt.core.errors import UserError


@cache
def field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings of a dataclass, read from its source."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for node, nxt in itertools.pairwise(body):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def default_of(f: dataclasses.Field[Any]) -> Any:
    """A field's default value (built, for a default factory); MISSING when it has none."""
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def type_name(tp: Any) -> str:
    """A type annotation as a user reads it: ``int | null``, ``fp32|bf16``, ``list[str]``."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "|".join(str(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list[{type_name(typing.get_args(tp)[0])}]"
    if origin is dict:
        return "map"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return "section"
    return getattr(tp, "__name__", str(tp))


def describe(cls: type, prefix: str = "") -> list[tuple[str, str, Any, str]]:
    """Every leaf field of a dataclass tree as (dotted name, type, default, help), in order.

    A field whose type is itself a dataclass (optionally ``| None``) is descended into.
    """
    rows = []
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        inner = nested_dataclass(hints[f.name])
        name = f"{prefix}{f.name}"
        if inner is not None:
            rows.append((name, "section", None, docs.get(f.name, "")))
            rows.extend(describe(inner, f"{name}."))
        else:
            rows.append((name, type_name(hints[f.name]), default_of(f), docs.get(f.name, "")))
    return rows


def nested_dataclass(tp: Any) -> type | None:
    """The dataclass in ``tp`` (``Section`` or ``Section | None``), else None."""
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        return tp
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        found = [a for a in typing.get_args(tp) if dataclasses.is_dataclass(a) and isinstance(a, type)]
        return found[0] if len(found) == 1 else None
    return None


class Invalid(Exception):
    """A value does not fit a type (turned into a UserError naming the key by the caller)."""


def coerce(value: Any, tp: Any) -> Any:
    """Check ``value`` against the annotation ``tp``, converting where YAML is ambiguous.

    Raises:
        Invalid: saying what the type takes.
    """
    origin = typing.get_origin(tp)
    if origin is Literal:
        if value in typing.get_args(tp) and not isinstance(value, bool):
            return value
        raise Invalid(f"one of {', '.join(map(str, typing.get_args(tp)))}")
    if origin in (typing.Union, types.UnionType):
        return _coerce_union(value, tp)
    if origin is dict:
        key_tp, value_tp = typing.get_args(tp)
        if not isinstance(value, dict):
            raise Invalid(f"a mapping of {type_name(key_tp)} to {type_name(value_tp)}")
        return {coerce(k, key_tp): coerce(v, value_tp) for k, v in value.items()}
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list):
            raise Invalid(f"a list of {type_name(item_tp)}")
        return [coerce(v, item_tp) for v in items]
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if isinstance(value, dict):  # a section inside a list or union: build() names its keys
            return build(tp, value, type_name(tp))
        raise Invalid("a mapping of keys")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise Invalid("true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise Invalid("an integer")
    if tp is float:
        return _coerce_float(value)
    if tp is str:
        if isinstance(value, str):
            return value
        raise Invalid("a string")
    raise TypeError(f"schema type {tp!r} has no coercion rule")  # a schema bug, not user input


def _coerce_union(value: Any, tp: Any) -> Any:
    expected = []
    for arg in typing.get_args(tp):
        if arg is type(None):
            if value is None:
                return None
            expected.append("null")
            continue
        try:
            return coerce(value, arg)
        except Invalid as e:
            expected.append(str(e))
    raise Invalid(" or ".join(expected))


def _coerce_float(value: Any) -> float:
    # PyYAML reads 1e-4 (no dot) as a string: accept any numeric spelling, but not nan or inf,
    # which would slip through every range check (nan > 0 is merely False).
    number = None
    if isinstance(value, (int, float, str)) and not isinstance(value, bool):
        with contextlib.suppress(ValueError, OverflowError):  # not a number, or beyond float's range
            number = float(value)
    if number is not None and math.isfinite(number):
        return number
    raise Invalid("a finite number")


def closest(name: str, options: list[str]) -> str:
    """`` (did you mean 'x'?)`` for the nearest option, else the list of valid ones."""
    match = difflib.get_close_matches(name, options, n=1, cutoff=0.5)
    return f" (did you mean '{match[0]}'?)" if match else f" (valid: {', '.join(options)})"


T = typing.TypeVar("T")


def build(cls: type[T], values: Any, source: str, prefix: str = "") -> T:
    """An instance of the dataclass ``cls`` from a mapping, every value checked.

    Args:
        cls: the dataclass (its fields' annotations are the schema).
        values: the mapping (None counts as empty).
        source: what to name in messages (a file, ``--set``).
        prefix: the dotted section the keys belong to (``train.``), for messages.

    Raises:
        UserError: not a mapping, an unknown key (naming the closest valid one), or a value that
            does not fit its type (naming the key and what it takes).
    """
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise UserError(f"{source}: {prefix.rstrip('.') or 'this'} must be a mapping of keys")
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        if key not in hints:
            valid = [f"{prefix}{k}" for k in hints]
            raise UserError(f"{source}: unknown key '{prefix}{key}'{closest(f'{prefix}{key}', valid)}")
        inner = nested_dataclass(hints[key])
        if inner is not None and isinstance(value, dict):
            kwargs[key] = build(inner, value, source, f"{prefix}{key}.")
            continue
        try:
            kwargs[key] = coerce(value, hints[key])
        except Invalid as e:
            raise UserError(f"{source}: {prefix}{key} = {value!r} is not valid: expected {e}") from None
    missing = [
        f.name
        for f in dataclasses.fields(cls)  # type: ignore[arg-type]
        if f.name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise UserError(f"{source}: {', '.join(prefix + m for m in missing)} missing; it has no default")
    return cls(**kwargs)

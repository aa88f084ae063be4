"""Corpus readers: files and globs of .txt, .jsonl, .json, .csv and .tsv into documents.

Every problem is a :class:`UserError` that names the file (and line or record) and what to do.
"""

from __future__ import annotations

import csv
import glob
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ecoadapt.data import builtin
from ecoadapt.errors import UserError

SUFFIXES = (".txt", ".jsonl", ".json", ".csv", ".tsv")


@dataclass(frozen=True)
class Document:
    """One document of a corpus, with where it came from (for messages)."""

    text: str
    source: str


def resolve(patterns: list[str], base: Path | None = None) -> list[str]:
    """Expand files and globs into a sorted, de-duplicated list of sources.

    ``builtin:NAME`` entries pass through. Relative paths are read from ``base`` (the config
    file's folder) when given and present there, else from the working directory.

    Raises:
        UserError: a pattern that matches no file, or a file of an unknown type.
    """
    out: list[str] = []
    for pattern in patterns:
        if pattern.startswith(builtin.PREFIX):
            builtin.check_name(pattern, {**builtin.CORPORA, **builtin.TASKS})
            out.append(pattern)
            continue
        candidates = [pattern]
        if base is not None and not Path(pattern).is_absolute():
            candidates.insert(0, str(base / pattern))
        matches: list[str] = []
        for candidate in candidates:
            matches = sorted(p for p in glob.glob(candidate, recursive=True) if Path(p).is_file())
            if matches:
                break
        if not matches:
            raise UserError(f"data.train: '{pattern}' matches no file (check the path; globs like data/*.txt work)")
        for m in matches:
            if Path(m).suffix.lower() not in SUFFIXES:
                raise UserError(f"{m}: unknown corpus type '{Path(m).suffix}'; use one of {', '.join(SUFFIXES)}")
            if m not in out:
                out.append(m)
    return out


def records(source: str, text_field: str = "text", json_key: str | None = None) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield (where, record) for each record of a .jsonl, .json, .csv or .tsv file.

    ``where`` names the file and line (or record index) for messages. CSV/TSV rows become
    dicts keyed by the header; ``text_field`` is checked against the header at once.
    """
    if source.startswith(builtin.PREFIX):
        yield from builtin.task_records(source)
        return
    path = Path(source)
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        for lineno, line in enumerate(_lines(path), 1):
            if not line.strip():
                continue
            yield f"{path}:{lineno}", _json(line, f"{path}:{lineno}")
    elif suffix == ".json":
        for i, record in enumerate(_json_records(path, text_field, json_key)):
            yield f"{path}: record {i}", record
    elif suffix in (".csv", ".tsv"):
        yield from _table(path, text_field, "\t" if suffix == ".tsv" else ",")
    else:
        raise UserError(f"{path}: expected a .jsonl, .json, .csv or .tsv file of records, not '{suffix}'")


def read(source: str, text_field: str = "text", json_key: str | None = None) -> Iterator[Document]:
    """Yield the documents of one source; empty and whitespace-only texts are skipped."""
    if source.startswith(builtin.PREFIX):
        for text in builtin.documents(source):
            yield Document(text, source)
        return
    path = Path(source)
    if path.suffix.lower() == ".txt":
        for lineno, line in enumerate(_lines(path), 1):
            if line.strip():
                yield Document(line.strip(), f"{path}:{lineno}")
        return
    for where, record in records(source, text_field, json_key):
        text = text_field_value(record, text_field, where)
        if text:
            yield Document(text, where)


def read_all(sources: list[str], text_field: str = "text", json_key: str | None = None) -> list[Document]:
    """All documents of all sources, in order.

    Raises:
        UserError: when the sources hold no document at all.
    """
    docs = [d for s in sources for d in read(s, text_field, json_key)]
    if not docs:
        raise UserError(f"data.train: {', '.join(sources)} holds no text (all files are empty?)")
    return docs


def _text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        line = path.read_bytes()[: e.start].count(b"\n") + 1
        raise UserError(f"{path}:{line}: not UTF-8 text (byte {e.start}); re-encode the file as UTF-8") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror})") from None


def _lines(path: Path) -> list[str]:
    # Lines end at \n (or \r\n) only: str.splitlines() also breaks at U+2028, form feeds and
    # other characters that may sit inside a JSON string, and would shift the line numbers.
    return [line.removesuffix("\r") for line in _text(path).split("\n")]


def _json(text: str, where: str) -> Any:
    """Parse JSON; any way it can fail becomes a message naming ``where``."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        line = f":{e.lineno}" if "\n" in text else ""  # a whole .json file: name the line
        raise UserError(f"{where}{line}: not valid JSON ({e.msg}); fix or remove it") from None
    except (ValueError, RecursionError) as e:  # integers beyond 4300 digits, nesting too deep
        raise UserError(f"{where}: JSON that cannot be read ({type(e).__name__}: {str(e)[:80]})") from None


def text_field_value(record: Any, text_field: str, where: str) -> str:
    """The stripped text of ``record[text_field]`` ("" for null); errors name ``where``."""
    if not isinstance(record, dict):
        raise UserError(f"{where}: expected an object with a '{text_field}' field, got {type(record).__name__}")
    if text_field not in record:
        fields = ", ".join(sorted(map(str, record))) or "none"
        raise UserError(f"{where}: no field '{text_field}' (fields: {fields}); set data.text_field")
    value = record[text_field]
    if value is None:
        return ""
    if not isinstance(value, str):
        raise UserError(f"{where}: field '{text_field}' is {type(value).__name__}, not text")
    return value.strip()


def _json_records(path: Path, text_field: str, json_key: str | None) -> list[Any]:
    data = _json(_text(path), str(path))
    if isinstance(data, list):
        return data
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a list of records or an object holding one")
    if json_key is not None:
        if json_key not in data or not isinstance(data[json_key], list):
            raise UserError(f"{path}: data.json_key '{json_key}' is not a list in this file (keys: {', '.join(data)})")
        return list(data[json_key])
    # COCO-style files hold several lists (images, annotations): take the one whose records
    # carry the text field, and only when that choice is unambiguous.
    lists = {k: v for k, v in data.items() if isinstance(v, list) and v and isinstance(v[0], dict)}
    with_field = [k for k, v in lists.items() if text_field in v[0]]
    if len(with_field) == 1:
        return list(lists[with_field[0]])
    if not with_field:
        raise UserError(
            f"{path}: no list of records with a '{text_field}' field (lists: {', '.join(lists) or 'none'}); "
            "set data.text_field or data.json_key"
        )
    raise UserError(f"{path}: several lists hold '{text_field}' ({', '.join(with_field)}); set data.json_key")


def _table(path: Path, text_field: str, delimiter: str) -> Iterator[tuple[str, dict[str, Any]]]:
    # newline="" lets the csv module see quoted line breaks inside fields, as it expects.
    rows = csv.reader(io.StringIO(_text(path), newline=""), delimiter=delimiter)
    csv.field_size_limit(2**31 - 1)  # the default 128 KiB refuses long documents
    try:
        header = next(rows, None)
        if header is None:
            return
        header = [h.strip() for h in header]
        if text_field not in header:
            raise UserError(f"{path}:1: no column '{text_field}' (columns: {', '.join(header)}); set data.text_field")
        for row in rows:
            if not row:
                continue
            if len(row) < len(header):
                raise UserError(f"{path}:{rows.line_num}: the row has {len(row)} columns, the header {len(header)}")
            yield f"{path}:{rows.line_num}", dict(zip(header, row, strict=False))
    except csv.Error as e:
        raise UserError(f"{path}:{rows.line_num}: not a valid {path.suffix[1:]} row ({e})") from None

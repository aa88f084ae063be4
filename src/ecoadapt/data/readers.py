"""Corpus readers: files, globs and folders into documents, streamed.

Formats: .txt (a document per line), .jsonl, .json, .csv, .tsv, .parquet, and folders written by
Hugging Face ``datasets``' ``save_to_disk``; .txt, .jsonl, .csv and .tsv may be compressed
(.gz, or .zst with the ``formats`` extra). Everything is read a line, a row or an Arrow record
batch at a time: nothing proportional to the file is held in memory, except a .json file (a
single JSON value), which is checked against the memory available first.

Every problem is a :class:`UserError` that names the file (and line or record) and what to do.
"""

from __future__ import annotations

import codecs
import csv
import glob
import gzip
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, cast

import psutil

from ecoadapt.core.errors import UserError
from ecoadapt.data import builtin, hub_datasets

SUFFIXES = (".txt", ".jsonl", ".json", ".csv", ".tsv", ".parquet")
COMPRESSED = (".gz", ".zst")  # for the line- and row-based formats
STREAMABLE = (".txt", ".jsonl", ".csv", ".tsv")
DATASET_FOLDER_MARKER = "state.json"  # what datasets' save_to_disk writes beside its Arrow files
JSON_MEMORY_FACTOR = 10  # a parsed JSON value takes about this many times its file's bytes
# A document longer than this many characters (about 13k tokens) is cut into pieces, at
# whitespace, before it reaches a tokenizer, and a .txt line is read in pieces of this size, so
# no line length can exhaust memory: a tokenizer holds about 70 bytes per character of one
# sequence (2 MiB as one text: +145 MiB peak; in 64 pieces: +33 MiB). Each piece is stored as a
# document of its own (a causal LM's separator follows it), in its document's split.
PIECE_CHARS = 64 * 2**10
RECORD_LINE_BYTES = 256 * 2**20  # a .jsonl line is parsed whole: one longer than this is refused


def file_format(path: Path) -> tuple[str, str | None]:
    """(format suffix, compression suffix or None) of a corpus file: ``a.jsonl.gz`` is
    (".jsonl", ".gz"); a ``save_to_disk`` folder is ("dataset", None)."""
    if path.is_dir():
        return "dataset", None
    suffix = path.suffix.lower()
    if suffix in COMPRESSED:
        return Path(path.stem).suffix.lower(), suffix
    return suffix, None


@dataclass(frozen=True)
class Document:
    """One document of a corpus (or a piece of a long one), with where it came from.

    Attributes:
        text: the text.
        source: where it came from, for messages ("file:line").
        split_key: what decides its split (train or held out) by its hash: its own text, or for
            the pieces of a long document the first piece's, so that a document is never split
            across the two.
        piece: its index among the pieces of its document (0: the first, or not cut).
    """

    text: str
    source: str
    split_key: str = ""
    piece: int = 0

    @property
    def key(self) -> str:
        """The text whose hash decides the split."""
        return self.split_key or self.text


def resolve(patterns: list[str], base: Path | None = None, key: str = "data.train") -> list[str]:
    """Expand files and globs into a sorted, de-duplicated list of sources.

    ``builtin:NAME`` and ``hf:ORG/NAME`` (a hub dataset, see :mod:`ecoadapt.data.hub_datasets`)
    entries pass through. Relative paths are read from ``base`` (the config
    file's folder) when given and present there, else from the working directory.

    Raises:
        UserError: a pattern that matches no file (naming ``key``), or a file of an unknown type.
    """
    out: list[str] = []
    for pattern in patterns:
        if pattern.startswith(builtin.PREFIX):
            builtin.check_name(pattern, {**builtin.CORPORA, **builtin.TASKS})
            out.append(pattern)
            continue
        if hub_datasets.is_hub(pattern):
            hub_datasets.parse(pattern)  # loaded (from the cache, or downloaded) when it is read
            out.append(pattern)
            continue
        candidates = [pattern]
        if base is not None and not Path(pattern).is_absolute():
            candidates.insert(0, str(base / pattern))
        matches: list[str] = []
        for candidate in candidates:
            matches = sorted(p for p in glob.glob(candidate, recursive=True) if _is_source(Path(p)))
            if matches:
                break
        if not matches:
            raise UserError(f"{key}: '{pattern}' matches no file (check the path; globs like data/*.txt work)")
        for m in matches:
            _check_format(Path(m))
            if m not in out:
                out.append(m)
    return out


def _is_source(path: Path) -> bool:
    return path.is_file() or (path.is_dir() and (path / DATASET_FOLDER_MARKER).is_file())


def _check_format(path: Path) -> None:
    fmt, compression = file_format(path)
    if fmt == "dataset":
        return
    if fmt not in SUFFIXES:
        kinds = ", ".join(SUFFIXES) + ", a datasets save_to_disk folder; .gz or .zst compressed"
        raise UserError(f"{path}: unknown corpus type '{''.join(path.suffixes[-2:]) or path.name}'; use {kinds}")
    if compression is not None and fmt not in STREAMABLE:
        raise UserError(f"{path}: {fmt} files cannot be read compressed; decompress it, or use .jsonl{compression}")


class BadRecords:
    """What to do with a record that cannot be used (a line that is not JSON, a missing or
    empty field): stop with its error (policy "error"), or skip it and count it ("skip"), as
    users of messy public data expect. ``setting`` names the config key in the error's hint."""

    EXAMPLES = 3  # skipped records named in the summary

    def __init__(self, policy: str = "error", setting: str = "data.bad_records") -> None:
        self.policy = policy
        self.setting = setting
        self.skipped = 0
        self.examples: list[str] = []

    def handle(self, error: UserError) -> None:
        """Raise ``error`` (policy "error", with how to skip instead) or count it."""
        if self.policy != "skip":
            raise UserError(f"{error}; or set {self.setting}: skip to skip such records (counted)") from None
        self.skipped += 1
        if len(self.examples) < self.EXAMPLES:
            self.examples.append(str(error))

    def summary(self) -> dict[str, Any]:
        """For summary.json: the policy, how many records were skipped, the first few reasons."""
        return {"policy": self.policy, "skipped": self.skipped, "examples": self.examples}


def records(
    source: str, text_field: str = "text", json_key: str | None = None, bad: BadRecords | None = None
) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield (where, record) for each record of a .jsonl, .json, .csv or .tsv file.

    ``where`` names the file and line (or record index) for messages. CSV/TSV rows become
    dicts keyed by the header; ``text_field`` is checked against the header at once. A .jsonl
    line that is not JSON goes to ``bad`` (default: an error).
    """
    bad = bad or BadRecords()
    if source.startswith(builtin.PREFIX):
        yield from builtin.task_records(source)
        return
    if hub_datasets.is_hub(source):
        yield from hub_datasets.records(source, text_field)
        return
    path = Path(source)
    suffix, _ = file_format(path)
    if suffix == ".jsonl":
        for lineno, line in _lines(path):
            if not line.strip():
                continue
            try:
                record = _json(line, f"{path}:{lineno}")
            except UserError as e:
                bad.handle(e)
                continue
            yield f"{path}:{lineno}", record
    elif suffix == ".json":
        for i, record in enumerate(_json_records(path, text_field, json_key)):
            yield f"{path}: record {i}", record
    elif suffix in (".csv", ".tsv"):
        yield from _table(path, text_field, "\t" if suffix == ".tsv" else ",")
    elif suffix in (".parquet", "dataset"):
        yield from _arrow_records(path, text_field)
    else:
        raise UserError(f"{path}: expected a file of records (.jsonl, .json, .csv, .tsv, .parquet), not '{suffix}'")


def read(
    source: str, text_field: str = "text", json_key: str | None = None, bad: BadRecords | None = None
) -> Iterator[Document]:
    """Yield the documents of one source; empty and whitespace-only texts are skipped, records
    without a usable text go to ``bad`` (default: an error)."""
    bad = bad or BadRecords()
    if source.startswith(builtin.PREFIX):
        for text in builtin.documents(source):
            yield Document(text, source)
        return
    path = Path(source)
    if not hub_datasets.is_hub(source) and file_format(path)[0] == ".txt":
        yield from _txt_documents(path)
        return
    for where, record in records(source, text_field, json_key, bad):
        try:
            text = text_field_value(record, text_field, where)
        except UserError as e:
            bad.handle(e)
            continue
        if text:
            yield from _pieces(text, where)


def _pieces(text: str, where: str) -> Iterator[Document]:
    """``text`` as one document, or in pieces of at most PIECE_CHARS cut at whitespace."""
    if len(text) <= PIECE_CHARS:
        yield Document(text, where)
        return
    first = ""
    for i, piece in enumerate(cut_at_whitespace(text, PIECE_CHARS)):
        first = first or piece
        yield Document(piece, where, first, i)


def cut_at_whitespace(text: str, limit: int) -> Iterator[str]:
    """Pieces of ``text`` of at most ``limit`` characters, each ending at the last whitespace
    before the limit where the second half of the piece has one (else cut there)."""
    start = 0
    while len(text) - start > limit:
        end = start + limit
        space = max(text.rfind(c, start + limit // 2, end) for c in " \t\n\r")
        end = space + 1 if space >= 0 else end
        piece = text[start:end].strip()
        if piece:
            yield piece
        start = end
    rest = text[start:].strip()
    if rest:
        yield rest


def _txt_documents(path: Path) -> Iterator[Document]:
    """The lines of a .txt file as documents, each read in pieces of at most PIECE_CHARS bytes,
    so that memory stays bounded whatever a line's length; a long line becomes several pieces,
    cut at whitespace, that share its split."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    lineno, carry, piece, first = 1, "", 0, ""
    with open_binary(path) as f:
        try:
            while raw := f.readline(PIECE_CHARS):
                if lineno == 1 and not piece and not carry:
                    raw = raw.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 byte-order mark
                ends = raw.endswith(b"\n") or len(raw) < PIECE_CHARS  # shorter without one: the last line
                try:
                    text = carry + decoder.decode(raw, final=ends)
                except UnicodeDecodeError as e:
                    raise UserError(
                        f"{path}:{lineno}: not UTF-8 text (byte {e.start} of the line); re-encode the file as UTF-8"
                    ) from None
                carry = ""
                if not ends:  # a piece of a long line: keep what follows its last whitespace
                    cut = max(text.rfind(c, len(text) // 2) for c in " \t\r")
                    text, carry = (text[: cut + 1], text[cut + 1 :]) if cut >= 0 else (text, "")
                if text.strip():
                    first = first or text.strip()
                    yield Document(text.strip(), f"{path}:{lineno}", first if (piece or not ends) else "", piece)
                    piece += 1
                if ends:
                    lineno, piece, first = lineno + 1, 0, ""
            if carry.strip():
                yield Document(carry.strip(), f"{path}:{lineno}", first, piece)
        except (OSError, EOFError) as e:  # a truncated or corrupt compressed file
            raise UserError(f"{path}: cannot be read to the end ({type(e).__name__}: {e})") from None


def open_binary(path: Path) -> IO[bytes]:
    """The file's bytes, decompressed as its name says (.gz, .zst)."""
    _, compression = file_format(path)
    try:
        if compression == ".gz":
            return cast(IO[bytes], gzip.open(path, "rb"))
        if compression == ".zst":
            try:
                import zstandard
            except ImportError:
                raise UserError(f"{path}: reading .zst needs zstandard: pip install 'ecoadapt[formats]'") from None
            # Buffered: the decompressing reader has no readline of its own.
            raw = zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True)  # noqa: SIM115
            return cast(IO[bytes], io.BufferedReader(raw))
        return open(path, "rb")
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror})") from None


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, text) of every line, streamed.

    Lines end at \n (or \r\n) only: str.splitlines() also breaks at U+2028, form feeds and
    other characters that may sit inside a JSON string, and would shift the line numbers.
    """
    with open_binary(path) as f:
        try:
            for lineno, raw in enumerate(iter(lambda: f.readline(RECORD_LINE_BYTES + 1), b""), 1):
                if len(raw) > RECORD_LINE_BYTES:
                    raise UserError(
                        f"{path}:{lineno}: a record of over {RECORD_LINE_BYTES // 2**20} MiB, which would be "
                        "read whole; split it into several records, or give the text as a .txt file"
                    )
                if lineno == 1:
                    raw = raw.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 byte-order mark
                try:
                    yield lineno, raw.decode("utf-8").removesuffix("\n").removesuffix("\r")
                except UnicodeDecodeError as e:
                    raise UserError(
                        f"{path}:{lineno}: not UTF-8 text (byte {e.start} of the line); re-encode the file as UTF-8"
                    ) from None
        except (OSError, EOFError) as e:  # a truncated or corrupt compressed file
            raise UserError(f"{path}: cannot be read to the end ({type(e).__name__}: {e})") from None


def _text(path: Path) -> str:
    """A whole (small) file's text, for .json, after checking it fits in memory."""
    size = path.stat().st_size
    available = psutil.virtual_memory().available
    if size * JSON_MEMORY_FACTOR > available:
        raise UserError(
            f"{path}: a {size / 2**30:.1f} GiB .json file is parsed whole, which needs about "
            f"{size * JSON_MEMORY_FACTOR / 2**30:.0f} GiB of memory ({available / 2**30:.1f} GiB free); "
            "convert it to .jsonl (one record per line), which is streamed"
        )
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        line = path.read_bytes()[: e.start].count(b"\n") + 1
        raise UserError(f"{path}:{line}: not UTF-8 text (byte {e.start}); re-encode the file as UTF-8") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror})") from None


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


# The longest field a .csv/.tsv row may hold, in characters: a long document fits (16 M characters
# is a 2,500-page book), and an unbalanced quote, which makes the rest of the file one field, is
# an error naming its line in bounded memory instead of millions of rows read as one document.
CSV_FIELD_LIMIT = 16 * 2**20


def _table(path: Path, text_field: str, delimiter: str) -> Iterator[tuple[str, dict[str, Any]]]:
    # newline="" lets the csv module see quoted line breaks inside fields, as it expects.
    text = io.TextIOWrapper(open_binary(path), encoding="utf-8-sig", newline="")
    rows = csv.reader(text, delimiter=delimiter)
    csv.field_size_limit(CSV_FIELD_LIMIT)
    start = 1  # the line the row being read starts on
    try:
        header = next(rows, None)
        if header is None:
            return
        header = [h.strip() for h in header]
        if text_field not in header:
            raise UserError(f"{path}:1: no column '{text_field}' (columns: {', '.join(header)}); set data.text_field")
        while True:
            start = rows.line_num + 1
            row = next(rows, None)
            if row is None:
                break
            if not row:
                continue
            if len(row) < len(header):
                raise UserError(f"{path}:{rows.line_num}: the row has {len(row)} columns, the header {len(header)}")
            yield f"{path}:{start}", dict(zip(header, row, strict=False))
    except csv.Error as e:
        if "field larger than field limit" in str(e):
            raise UserError(
                f"{path}:{start}: a field runs on past {CSV_FIELD_LIMIT // 2**20} M characters: most likely a quote "
                '(") opened on this line and never closed; close or double it ("")'
            ) from None
        raise UserError(f"{path}:{rows.line_num}: not a valid {path.suffix[1:]} row ({e})") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{path}:{rows.line_num + 1}: not UTF-8 text ({e.reason}); re-encode it as UTF-8") from None
    finally:
        text.close()


ARROW_BATCH_ROWS = 4096  # rows per Arrow record batch read: bounded memory, few Python calls


def _arrow_records(path: Path, text_field: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """Rows of a Parquet file or a datasets save_to_disk folder, a record batch at a time."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError(
            f"{path}: reading Parquet and datasets folders needs pyarrow: pip install 'ecoadapt[formats]'"
        ) from None
    if path.is_dir():
        batches = _dataset_batches(path, pa)
        schema_names = None
    else:
        try:
            parquet = pq.ParquetFile(path)
        except (OSError, pa.ArrowException) as e:
            raise UserError(f"{path}: not a readable Parquet file ({e})") from None
        schema_names = parquet.schema_arrow.names
        if text_field not in schema_names:
            raise UserError(
                f"{path}: no column '{text_field}' (columns: {', '.join(schema_names)}); set the text field"
            )
        batches = parquet.iter_batches(batch_size=ARROW_BATCH_ROWS)
    row = 0
    for batch in batches:
        if schema_names is None and text_field not in batch.schema.names:
            raise UserError(
                f"{path}: no column '{text_field}' (columns: {', '.join(batch.schema.names)}); set the text field"
            )
        for record in batch.to_pylist():
            yield f"{path}: row {row}", record
            row += 1


def _dataset_batches(folder: Path, pa: Any) -> Iterator[Any]:
    """The record batches of a datasets save_to_disk folder (Arrow stream files, memory-mapped)."""
    try:
        state = json.loads((folder / DATASET_FOLDER_MARKER).read_text())
        files = [folder / f["filename"] for f in state["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{folder}: not a datasets save_to_disk folder ({type(e).__name__}: {e})") from None
    for file in files:
        try:
            with pa.memory_map(str(file)) as source:
                reader = pa.ipc.open_stream(source)
                yield from reader
        except (OSError, pa.ArrowException) as e:
            raise UserError(f"{file}: not a readable Arrow file ({e})") from None

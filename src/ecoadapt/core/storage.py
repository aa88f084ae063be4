"""One home for the files ecoadapt writes: atomic replacement, durable JSON lines, the cache root.

Every file a user or a later run trusts (summary.json, config.yaml, checkpoints, token stores,
caches of measurements, reports) is written through :func:`atomic_write`: a crash at any moment
leaves the old file or the new one, never a torn one. Logs that grow (metrics.jsonl,
results.jsonl) are appended a whole line per ``write`` call and fsynced, and read back with
:func:`read_jsonl`, which skips a line torn by a kill.

No torch here: the report reads results through this module on machines without a GPU stack.
"""

from __future__ import annotations

import glob
import json
import os
import socket
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, BinaryIO

_HOST = socket.gethostname().replace(".", "-").replace("/", "-")  # in temp names: whose writer it was


def atomic_write(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Write ``path`` through a temp file in its folder, fsync, rename, fsync the folder.

    Args:
        path: the file to create or replace.
        write: writes the contents to the (binary) file it is given.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    # The writer in the name: a temp file its dead writer left behind is removed by the next write.
    prefix = f".{path.name}.{_HOST}.{os.getpid()}."
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=prefix, suffix=".tmp")
    try:
        # mkstemp makes the file 0600; the file it becomes is the user's, as any file they
        # create: readable by their group (a shared cache, a teammate's summary) as umask says.
        os.fchmod(fd, 0o666 & ~current_umask())
        with os.fdopen(fd, "wb") as f:
            recorded = _RecordingWriter(f)
            try:
                write(recorded)  # type: ignore[arg-type]  # a file object in all but name
            except Exception as e:
                if recorded.error is not None and recorded.error is not e:
                    raise recorded.error from e  # the library wrapped the OSError: the OSError it was
                raise
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync(path.parent)  # the rename itself survives a power cut
    remove_stale_temps(path)


class _RecordingWriter:
    """A binary file that remembers the OSError a write raised (a full disk), for the writers
    that turn it into an error of their own (torch.save's RuntimeError names no cause)."""

    def __init__(self, f: BinaryIO) -> None:
        self._f = f
        self.error: OSError | None = None

    def write(self, data: Any) -> int:
        try:
            return self._f.write(data)
        except OSError as e:
            self.error = e
            raise

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)


def fsync(path: Path) -> None:
    """Flush a file, or a folder (the names in it), to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_stale_temps(path: Path) -> list[Path]:
    """Remove the temp files of ``path`` whose writers, on this machine, have died (a kill
    mid-write); those of live writers, and of other machines sharing the folder, stay."""
    import psutil

    removed = []
    for stale in path.parent.glob(f".{glob.escape(path.name)}.{glob.escape(_HOST)}.*.tmp"):
        pid = stale.name[len(f".{path.name}.{_HOST}.") :].split(".", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not psutil.pid_exists(int(pid)):
            stale.unlink(missing_ok=True)
            removed.append(stale)
    return removed


def current_umask() -> int:
    """The process's file-mode creation mask (read without changing it where Linux allows)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)  # elsewhere: set and restore at once (not thread-safe, briefly)
    os.umask(mask)
    return mask


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def write_json(path: Path, data: Any) -> None:
    """Atomically write ``data`` as indented JSON."""
    atomic_write_text(path, json.dumps(data, indent=2, default=str) + "\n")


def read_json(path: Path) -> Any:
    """The JSON in ``path`` (raises OSError or ValueError as json does)."""
    return json.loads(path.read_text(encoding="utf-8"))


def read_cache(path: Path, warn: Callable[[str], None]) -> Any:
    """A cache file's JSON, or None when it is missing or cannot be read (torn, edited, another
    version's): a cache only saves work, so an unreadable one is measured again, said once."""
    if not path.is_file():
        return None
    try:
        return read_json(path)
    except (OSError, ValueError) as e:
        warn(f"note: the cache file {path} cannot be read ({type(e).__name__}); it is measured again")
        return None


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    """Append one record and fsync it: a line is there whole or not at all. A short write (a
    signal, a full disk) is finished, or, when the rest cannot be written, cut back off so that
    the next record does not join a torn line."""
    data = (json.dumps(record, default=str) + "\n").encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        start = os.fstat(fd).st_size
        written = 0
        try:
            while written < len(data):
                written += os.write(fd, data[written:])
            os.fsync(fd)
        except OSError:
            os.ftruncate(fd, start)
            raise
    finally:
        os.close(fd)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The records of a JSON-lines file; a line torn by a kill (or not an object) is skipped."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def latest_by(records: Iterable[dict[str, Any]], key: Callable[[dict[str, Any]], str]) -> dict[str, dict[str, Any]]:
    """The last record for each key, in first-seen key order (a retried sweep point's last
    attempt is the one that counts)."""
    latest: dict[str, dict[str, Any]] = {}
    for record in records:
        latest[key(record)] = record
    return latest


def cache_root() -> Path:
    """ecoadapt's cache folder: ``$ECOADAPT_CACHE``, else ``~/.cache/ecoadapt``.

    Token stores live in ``tokens/`` below it (unless data.cache_dir says otherwise), probed
    matmul peaks in ``peak_flops.json``.
    """
    env = os.environ.get("ECOADAPT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "ecoadapt"

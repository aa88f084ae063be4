"""What ecoadapt wrote in a folder, by record: the manifest every output folder carries.

Every output folder (a run's, a sweep's, the demo's, a report's) holds ``.ecoadapt-manifest.json``,
the list of the entries ecoadapt made there. An entry is *claimed* (recorded, atomically) before it
is created, and *sealed* when the command that wrote it ends: its size and modification time are
recorded then, with a SHA-256 of its bytes when it is small (of its file list when it is a folder).

Overwriting, restarting and cleaning up remove only entries of the manifest, and only while they
are still what ecoadapt wrote: an entry that is not in the manifest, or that changed since it was
sealed, is the user's, and a folder holding one is refused with its names, never emptied. Nothing
is guessed from a file's name. A folder written by ecoadapt before manifests existed is taken over
only when the user asks (``ecoadapt adopt DIR``).

No torch here: reports and sweeps use it on machines without a GPU stack.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ecoadapt.core.errors import UserError
from ecoadapt.core.locks import open_no_follow
from ecoadapt.core.storage import read_json, write_json

MANIFEST = ".ecoadapt-manifest.json"
GUARD = ".ecoadapt-manifest.lock"  # held (flock) while the manifest is read and rewritten
LEGACY_MARKER = ".ecoadapt-run"  # what run folders of ecoadapt 0.3 and before carry instead
HASHED_BYTES = 1 << 20  # files up to this size are fingerprinted by their bytes, larger ones by size and time
SHOWN = 5  # entries named in a refusal


def fingerprint(path: Path) -> dict[str, Any]:
    """What an entry is now: a file's size, mtime (ns) and, when small, SHA-256; a folder's
    SHA-256 over its files' relative names, sizes and mtimes; a link's target."""
    st = path.lstat()
    if path.is_symlink():
        return {"kind": "link", "target": os.readlink(path)}
    if path.is_dir():
        lines = []
        for root, dirs, files in os.walk(path):
            dirs.sort()
            for name in sorted(files):
                f = Path(root) / name
                s = f.lstat()
                lines.append(f"{f.relative_to(path)}\t{s.st_size}\t{s.st_mtime_ns}")
        return {"kind": "dir", "files": len(lines), "sha256": hashlib.sha256("\n".join(lines).encode()).hexdigest()}
    out: dict[str, Any] = {"kind": "file", "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    if st.st_size <= HASHED_BYTES:
        out["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def nested_fingerprint(path: Path) -> dict[str, Any]:
    """A folder of output folders (a sweep's ``points/``): only that it is still a folder; each
    child is guarded by its own manifest (and a child without one is never removed)."""
    return {"kind": "folders" if path.is_dir() and not path.is_symlink() else "other"}


def _now(record: dict[str, Any], path: Path) -> dict[str, Any]:
    return nested_fingerprint(path) if record.get("nested") else fingerprint(path)


def _same(recorded: dict[str, Any], now: dict[str, Any]) -> bool:
    """Whether an entry is still what was sealed: the bytes when they were hashed, else size and time."""
    if recorded.get("kind") != now.get("kind"):
        return False
    if "sha256" in recorded and "sha256" in now:
        return bool(recorded["sha256"] == now["sha256"]) and recorded.get("size") == now.get("size")
    return all(recorded.get(k) == now.get(k) for k in ("size", "mtime_ns", "target"))


@dataclass
class Survey:
    """A folder's entries, sorted by whose they are.

    Attributes:
        own: entries of the manifest still as ecoadapt left them (or being written now).
        foreign: entries the manifest does not list: the user's.
        changed: entries of the manifest changed since ecoadapt sealed them: the user's now.
        legacy: the folder has no manifest but the marker of an older ecoadapt run folder.
    """

    own: list[str] = field(default_factory=list)
    foreign: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    legacy: bool = False


class Folder:
    """An output folder and its manifest.

    Args:
        path: the folder (it may not exist yet).
        key: what to name in messages: the config key or option that chose it (``output.dir``).
    """

    def __init__(self, path: Path, key: str = "output.dir") -> None:
        self.path, self.key = Path(path), key

    # -- reading -------------------------------------------------------------------------------

    def entries(self) -> dict[str, dict[str, Any]]:
        """The manifest's entries (name -> record); empty when there is none.

        Raises:
            UserError: the manifest exists but cannot be read.
        """
        file = self.path / MANIFEST
        if not file.is_file():
            return {}
        try:
            data = read_json(file)
            entries = data["entries"]
            assert isinstance(entries, dict)
        except (OSError, ValueError, KeyError, TypeError, AssertionError):
            raise UserError(
                f"{self.key}: {file} cannot be read, so what ecoadapt wrote in {self.path} is unknown; "
                "move the folder's files away or choose another folder"
            ) from None
        return entries

    def survey(self) -> Survey:
        """Sort the folder's entries into ecoadapt's and the user's."""
        survey = Survey()
        if not self.path.is_dir():
            return survey
        names = sorted(p.name for p in self.path.iterdir() if p.name not in (MANIFEST, GUARD))
        has_manifest = (self.path / MANIFEST).is_file()
        recorded = self.entries()
        survey.legacy = not has_manifest and LEGACY_MARKER in names
        for name in names:
            record = recorded.get(name) or recorded.get(_temp_owner(name, recorded))
            if record is None:
                survey.foreign.append(name)
            elif record.get("state") == "sealed" and not _same(record, _now(record, self.path / name)):
                survey.changed.append(name)
            else:
                survey.own.append(name)
        return survey

    def check_ours(self) -> Survey:
        """Refuse a folder ecoadapt cannot tell its own entries in: one with no manifest that
        holds anything, or one where an entry it recorded was changed since (the next write
        would replace the user's version). With a manifest, the user's own files beside
        ecoadapt's (notes on a run) are allowed: they are never removed.

        Raises:
            UserError: naming the entries and what to do.
        """
        survey = self.survey()
        if survey.legacy:
            raise UserError(
                f"{self.key}: {self.path} was written by an older ecoadapt, which kept no record of its files; "
                f"if everything in it is ecoadapt's, run `ecoadapt adopt {self.path}` once, else choose another folder"
            )
        if survey.foreign and not (self.path / MANIFEST).is_file():
            raise UserError(
                f"{self.key}: {self.path} holds files ecoadapt did not write ({_shown(survey.foreign)}); ecoadapt "
                "never deletes or overwrites them: choose a new or empty folder"
            )
        if survey.changed:
            raise UserError(
                f"{self.key}: {self.path} holds files changed since ecoadapt wrote them ({_shown(survey.changed)}); "
                "ecoadapt never overwrites them: move them away (or choose another folder) and run again"
            )
        return survey

    # -- writing -------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _guarded(self) -> Iterator[dict[str, dict[str, Any]]]:
        """The entries, rewritten atomically when the body ends; one process at a time."""
        self.path.mkdir(parents=True, exist_ok=True)
        fresh = not os.path.lexists(self.path / GUARD)
        fd = open_no_follow(self.path / GUARD)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # held for milliseconds: a rewrite of a small file
            entries = self.entries()
            before = dict(entries)
            yield entries
            if entries != before or not (self.path / MANIFEST).is_file():
                write_json(self.path / MANIFEST, {"written_by": "ecoadapt", "version": 1, "entries": entries})
        except BaseException:
            if fresh and not (self.path / MANIFEST).is_file():  # refused in a folder of the user's: leave nothing
                (self.path / GUARD).unlink(missing_ok=True)
            raise
        finally:
            os.close(fd)

    def claim(self, *names: str, nested: tuple[str, ...] = ()) -> None:
        """Record that ecoadapt is about to write these entries (call before creating them).

        Args:
            names: entries (files or folders) in the folder.
            nested: folders of output folders, each with a manifest of its own (a sweep's points/).

        Raises:
            UserError: one of them exists and is not ecoadapt's (or changed since it was).
        """
        with self._guarded() as entries:
            for name in (*names, *nested):
                record = entries.get(name)
                exists = os.path.lexists(self.path / name)
                if exists and record is None:
                    raise UserError(
                        f"{self.key}: {self.path / name} was not written by ecoadapt; it is never overwritten: "
                        "move it away or choose another folder"
                    )
                sealed = exists and record is not None and record.get("state") == "sealed"
                if sealed and not _same(record or {}, _now(record or {}, self.path / name)):
                    raise UserError(
                        f"{self.key}: {self.path / name} changed since ecoadapt wrote it; it is never "
                        "overwritten: move it away or choose another folder"
                    )
                entries[name] = {"state": "open", **({"nested": True} if name in nested else {})}

    def seal(self) -> None:
        """Fingerprint every claimed entry that exists; forget those never created."""
        with self._guarded() as entries:
            for name in list(entries):
                path = self.path / name
                if not os.path.lexists(path):
                    del entries[name]
                elif entries[name].get("state") == "open":
                    entries[name] = {**entries[name], "state": "sealed", **_now(entries[name], path)}

    @contextlib.contextmanager
    def sealed_on_exit(self) -> Iterator[None]:
        """Seal when the block ends. Where the block failed, a seal that fails too (the full
        disk that stopped the block stops the manifest's rewrite as well) is dropped, so the
        user reads the block's own error, once; the claims made before each entry was created
        still guard it. After a block that succeeded, a failed seal is raised."""
        try:
            yield
        except BaseException:
            with contextlib.suppress(UserError, OSError):
                self.seal()
            raise
        self.seal()

    def remove(self, names: Iterable[str] | None = None, keep: Iterable[str] = ()) -> list[str]:
        """Remove entries ecoadapt wrote (all of them, or ``names``), after checking that every
        one is still its own; returns what was removed.

        Raises:
            UserError: the folder holds a user's entry (nothing is removed then).
        """
        survey = self.check_ours() if names is None else None
        kept = set(keep)
        removed = []
        with self._guarded() as entries:
            wanted = list(entries) if names is None else [n for n in names if n in entries]
            for name in wanted:
                path = self.path / name
                if name in kept or not os.path.lexists(path):
                    continue
                record = entries[name]
                if record.get("state") == "sealed" and not _same(record, _now(record, path)):
                    continue  # changed since: the user's now (check_ours refused it above when all were asked)
                if record.get("nested") and not _remove_nested(path):
                    continue  # a child is not ecoadapt's: it and the folder stay
                _delete(path)
                del entries[name]
                removed.append(name)
            if survey is not None:  # temp files of entries ecoadapt wrote, left by a killed writer
                for name in survey.own:
                    if name not in entries and name not in kept and os.path.lexists(self.path / name):
                        _delete(self.path / name)
                        removed.append(name)
        return removed

    def adopt(self, allowed: Iterable[str], marker: str = LEGACY_MARKER, nested: tuple[str, ...] = ()) -> list[str]:
        """Take over a folder that an older ecoadapt wrote (``marker`` there, no manifest): every
        entry is recorded as ecoadapt's, sealed as it is now, when every name is one ``allowed``.

        Args:
            allowed: the names such a folder may hold.
            marker: the entry that shows an older ecoadapt wrote it.
            nested: folders of output folders (adopted by the caller, one by one, first).

        Raises:
            UserError: there is a manifest already, no marker, or an entry ecoadapt never writes.
        """
        if (self.path / MANIFEST).is_file():
            raise UserError(f"{self.path}: already has ecoadapt's record of its files; nothing to adopt")
        names = sorted(p.name for p in self.path.iterdir() if p.name != GUARD) if self.path.is_dir() else []
        if marker not in names:
            raise UserError(f"{self.path}: no {marker}: not a folder an older ecoadapt wrote")
        allowed = {*allowed, *nested}
        strange = [n for n in names if n not in allowed]
        if strange:
            raise UserError(
                f"{self.path}: holds entries ecoadapt never writes ({_shown(strange)}); move them away, then adopt"
            )
        with self._guarded() as entries:
            for name in names:
                record = {"nested": True} if name in nested else {}
                entries[name] = {**record, "state": "sealed", **_now(record, self.path / name)}
        return names


def _temp_owner(name: str, recorded: dict[str, dict[str, Any]]) -> str:
    """The entry a temp file belongs to: ``.NAME.<host>.<pid>.<x>.tmp`` (storage.atomic_write's)
    or ``.NAME.tmp`` (a folder being exported), for a NAME the manifest records; else ""."""
    if not (name.startswith(".") and name.endswith(".tmp")):
        return ""
    for own in recorded:
        if name == f".{own}.tmp" or name.startswith(f".{own}."):
            return own
    return ""


def _remove_nested(path: Path) -> bool:
    """Remove what ecoadapt wrote in each output folder inside ``path`` (through each one's own
    manifest, all checked first); whether nothing is left in ``path`` then. A child with no
    manifest, or the user's files in one, stay (and so does ``path``).

    Raises:
        UserError: a child holds an entry changed since ecoadapt wrote it (nothing is removed).
    """
    if not path.is_dir() or path.is_symlink():
        return True
    children = [Folder(c) for c in sorted(path.iterdir()) if c.is_dir() and not c.is_symlink()]
    children = [c for c in children if (c.path / MANIFEST).is_file()]
    for child in children:
        child.check_ours()
    for child in children:
        child.remove()
        if all(p.name in (MANIFEST, GUARD) for p in child.path.iterdir()):
            shutil.rmtree(child.path)
    return not any(path.iterdir())


def _delete(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _shown(names: list[str]) -> str:
    more = f" and {len(names) - SHOWN} more" if len(names) > SHOWN else ""
    return ", ".join(names[:SHOWN]) + more

"""`ecoadapt adopt DIR`: let ecoadapt treat as its own a folder an older version wrote.

ecoadapt 0.3 and before kept no record of the files it wrote (a run folder had only a marker,
``.ecoadapt-run``; a sweep folder had its ``sweep.json``). This version removes and overwrites
only what its folders' manifests record, so such a folder is refused until the user says it is
ecoadapt's. Adopting records every entry as it is now, and only when every name is one that
version wrote: a folder holding anything else is refused, naming it.
"""

from __future__ import annotations

from pathlib import Path

from ecoadapt.commands.sweep import POINTS, SWEEP_ENTRIES, SWEEP_LOCK
from ecoadapt.core import ownership
from ecoadapt.core.errors import UserError
from ecoadapt.reports.builder import REPORT_FILES
from ecoadapt.results import rundir


def adopt(path: Path) -> list[Path]:
    """Record what an older ecoadapt wrote in the run or sweep folder ``path``; returns the
    folders adopted (a sweep's points first).

    Raises:
        UserError: not a folder an older ecoadapt wrote, already recorded, or holding an entry
            that version never wrote (named).
    """
    if not path.is_dir():
        raise UserError(f"{path}: no such folder")
    if (path / ownership.LEGACY_MARKER).is_file():
        ownership.Folder(path).adopt(rundir.LEGACY_ENTRIES)
        return [path]
    if (path / "sweep.json").is_file():
        adopted = [*_points(path / POINTS)]
        ownership.Folder(path).adopt((SWEEP_LOCK, *SWEEP_ENTRIES, *REPORT_FILES), marker="sweep.json", nested=(POINTS,))
        return [*adopted, path]
    raise UserError(
        f"{path}: neither a run folder ({ownership.LEGACY_MARKER}) nor a sweep folder (sweep.json) of an older "
        "ecoadapt; nothing to adopt"
    )


def _points(folder: Path) -> list[Path]:
    """Adopt each point's run folder (those recorded already are left as they are)."""
    adopted = []
    for point in sorted(folder.iterdir()) if folder.is_dir() else []:
        if point.is_dir() and not (point / ownership.MANIFEST).is_file():
            ownership.Folder(point).adopt(rundir.LEGACY_ENTRIES)
            adopted.append(point)
    return adopted

"""A sweep's ``results.jsonl``: one line per attempt of a point, the point's own fields beside the
run's summary. Written by the sweep, read by the sweep (to skip what is done) and the report,
always through :class:`PointRecord`, so a renamed field is a type error, not a missing key.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ecoadapt.config import schema
from ecoadapt.core import storage
from ecoadapt.results.summary import RunSummary


@dataclass
class PointFields:
    """The sweep's own fields of one attempt of a point (results.jsonl's, beside the summary)."""

    name: str | None = None
    """The point's name."""
    key: str | None = None
    """The hash of its resolved config (output folder excluded): what a rerun skips done points by."""
    baseline: bool = False
    """Whether it is the sweep's baseline."""
    overrides: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Dotted key -> value, applied on top of the sweep's base config."""
    run_dir: str | None = None
    """The point's run folder."""
    exit_code: int | None = None
    """How its process ended (0 done, 1 the task failed, 2 bad input, 128 + a signal's number)."""
    interrupted_by: str | None = None
    """The signal the sweep passed on to it (SIGTERM, SIGINT, SIGHUP), if one did."""


FIELDS = tuple(f.name for f in dataclasses.fields(PointFields))


@dataclass
class PointRecord:
    """One line of results.jsonl: the sweep's fields and the run's summary."""

    point: PointFields
    summary: RunSummary

    def to_line(self) -> dict[str, Any]:
        """The line as written: the point's fields beside the summary's (no None of the point's own)."""
        own = {k: v for k, v in dataclasses.asdict(self.point).items() if v is not None}
        return {**own, **self.summary.to_dict()}

    @classmethod
    def from_line(cls, record: dict[str, Any], source: str = "results.jsonl") -> PointRecord:
        """A line read back, both parts checked against their schemas.

        Raises:
            UserError: a field of the wrong type, or a key neither schema has.
        """
        own = {k: record[k] for k in FIELDS if k in record}
        rest = {k: v for k, v in record.items() if k not in FIELDS}
        return cls(schema.build(PointFields, own, source), RunSummary.from_dict(rest, source))


def latest_results(folder: Path, keys: set[str] | None = None) -> dict[str, dict[str, Any]]:
    """The last attempt of every point in ``folder``'s results.jsonl (of ``keys`` only, if given)."""
    records = storage.read_jsonl(folder / "results.jsonl")
    latest = storage.latest_by(records, lambda r: str(r.get("key", r.get("name"))))
    return {k: r for k, r in latest.items() if keys is None or k in keys}

"""A sweep's ``results.jsonl``: one line per attempt of a point, the point's own fields beside
the run's summary. Written by the sweep, read by the sweep (to skip what is done) and the report.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ecoadapt.core import storage
from ecoadapt.results.summary import RunSummary

# results.jsonl's own fields beside the summary: the point, its folder, how its process ended
RECORD_KEYS = ("name", "key", "baseline", "overrides", "run_dir", "exit_code", "interrupted_by")


def latest_results(folder: Path, keys: set[str] | None = None) -> dict[str, dict[str, Any]]:
    """The last attempt of every point in ``folder``'s results.jsonl (of ``keys`` only, if given)."""
    records = storage.read_jsonl(folder / "results.jsonl")
    latest = storage.latest_by(records, lambda r: str(r.get("key", r.get("name"))))
    return {k: r for k, r in latest.items() if keys is None or k in keys}


def split_record(record: dict[str, Any]) -> tuple[dict[str, Any], RunSummary]:
    """A results.jsonl line as (the sweep's own fields, the run's summary)."""
    meta = {k: record[k] for k in RECORD_KEYS if k in record}
    rest = {k: v for k, v in record.items() if k not in RECORD_KEYS}
    return meta, RunSummary.from_dict(rest, "results.jsonl")

"""Run one adapt job in a fresh Python process and read its summary.

A fresh process per run is what makes peak memory a run's own (the resident-set high-water mark
never goes down inside a process), and what keeps one run's failure from taking others down.
Sweeps and benchmarks both go through here.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

from ecoadapt.core.processes import echo_to_stderr, run_child
from ecoadapt.core.storage import read_json
from ecoadapt.results.summary import RunSummary


def run_adapt(
    config: dict[str, Any],
    run_dir: Path,
    timeout_s: float | None = None,
    stream_output: bool = False,
    paths_from: Path | None = None,
) -> dict[str, Any]:
    """Run ``ecoadapt adapt`` on ``config`` (nested sections) in a child process.

    Args:
        config: the run's config as nested plain data; ``output.dir`` is set to ``run_dir``.
        run_dir: the run directory to create.
        timeout_s: kill the child after this many seconds.
        stream_output: pass the child's stderr (progress) through as it comes; its last lines
            are kept either way, for the error of a failed run.
        paths_from: where the run looks relative corpus paths up first (the config is a temp
            file: never its folder); default the working folder.

    Returns:
        The summary.json the child wrote, or ``{"status": "failed", "error": ...}`` when it
        wrote none (bad config, crash, kill, timeout): a summary an earlier attempt left is never
        taken for this one's. ``exit_code`` is added, and ``interrupted_by`` (SIGTERM, SIGINT,
        SIGHUP) when a signal to this process was passed on to it.
    """
    config = {section: dict(values) for section, values in config.items()}
    config.setdefault("output", {})["dir"] = str(run_dir)
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        yaml.safe_dump(config, f)
        config_path = f.name
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    summary_path = run_dir / "summary.json"
    before = _stamp(summary_path)  # what an earlier attempt left, if anything
    where = str((paths_from or Path.cwd()).resolve())
    try:
        # Its own process group: a signal to the sweep reaches the run (and torchrun's ranks),
        # which checkpoints; a timeout stops all of it.
        child = run_child(
            [sys.executable, "-m", "ecoadapt", "adapt", config_path, "--paths-from", where],
            env=env,
            timeout_s=timeout_s,
            capture_stderr=True,
            on_line=echo_to_stderr if stream_output else None,
            stdout=subprocess.DEVNULL,
            follow=True,  # the point goes (checkpointing) when the sweep dies, however it dies
        )
    finally:
        Path(config_path).unlink(missing_ok=True)
    tail = [*child.tail, *([f"timed out after {timeout_s} s"] if child.timed_out else [])]
    summary = _written_since(summary_path, before)
    if summary is None:
        error = last_error(tail, child.exit_status, child.code)
        summary = RunSummary(status="failed", config=config, error=error).to_dict()
    summary["exit_code"] = child.exit_status
    if child.forwarded is not None:
        summary["interrupted_by"] = signal.Signals(child.forwarded).name
    return summary


def _written_since(path: Path, before: tuple[int, int, int] | None) -> dict[str, Any] | None:
    """The summary at ``path`` if the child wrote it (it is not the one ``before`` stamps)."""
    written = _stamp(path)
    if written is None or written == before:
        return None
    with contextlib.suppress(OSError, ValueError):
        loaded = read_json(path)
        return loaded if isinstance(loaded, dict) else None
    return None


def _stamp(path: Path) -> tuple[int, int, int] | None:
    """Which file is at ``path`` now (inode, size, mtime in ns), or None."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


def last_error(tail: list[str], exit_status: int, code: int) -> str:
    """A dead child's error in one line: its last line that says something (progress bars and
    their fragments are not), else how it ended (the signal that killed it, or its status)."""
    for line in reversed("".join(tail).replace("\r", "\n").splitlines()):
        text = line.strip()
        if text.startswith("ecoadapt:") or "Error" in text or "error" in text:
            return text
    if code < 0:
        return f"killed by {signal.Signals(-code).name} (exit status {exit_status}); rerun to resume it"
    lines = [line.strip() for line in "".join(tail).splitlines() if line.strip() and "%|" not in line]
    return lines[-1] if lines else f"exit status {exit_status}"

"""Run one adapt job in a fresh Python process and read its summary.

A fresh process per run is what makes peak memory a run's own (the resident-set high-water mark
never goes down inside a process), and what keeps one run's failure from taking others down.
Sweeps and benchmarks both go through here.
"""

from __future__ import annotations

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
    config: dict[str, Any], run_dir: Path, timeout_s: float | None = None, stream_output: bool = False
) -> dict[str, Any]:
    """Run ``ecoadapt adapt`` on ``config`` (nested sections) in a child process.

    Args:
        config: the run's config as nested plain data; ``output.dir`` is set to ``run_dir``.
        run_dir: the run directory to create.
        timeout_s: kill the child after this many seconds.
        stream_output: pass the child's stderr (progress) through as it comes; its last lines
            are kept either way, for the error of a failed run.

    Returns:
        The run's summary.json, or ``{"status": "failed", "error": ...}`` when the child
        failed before writing one (bad config, crash, timeout); ``exit_code`` is added, and
        ``interrupted_by`` (SIGTERM, SIGINT) when a signal to this process was passed on to it.
    """
    config = {section: dict(values) for section, values in config.items()}
    config.setdefault("output", {})["dir"] = str(run_dir)
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        yaml.safe_dump(config, f)
        config_path = f.name
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    try:
        # Its own process group: a signal to the sweep reaches the run (and torchrun's ranks),
        # which checkpoints; a timeout stops all of it.
        child = run_child(
            [sys.executable, "-m", "ecoadapt", "adapt", config_path],
            env=env,
            timeout_s=timeout_s,
            capture_stderr=True,
            on_line=echo_to_stderr if stream_output else None,
            stdout=subprocess.DEVNULL,
        )
    finally:
        Path(config_path).unlink(missing_ok=True)
    tail = list(child.tail)
    if child.timed_out:
        tail.append(f"timed out after {timeout_s} s")
    code = child.exit_status
    err = "".join(tail)
    summary_path = run_dir / "summary.json"
    if summary_path.exists():
        summary: dict[str, Any] = read_json(summary_path)
    else:
        lines = [line for line in err.strip().splitlines() if line.strip()]
        error = lines[-1] if lines else f"exit status {code}"
        summary = RunSummary(status="failed", config=config, error=error).to_dict()
    summary["exit_code"] = code
    if child.forwarded is not None:
        summary["interrupted_by"] = signal.Signals(child.forwarded).name
    return summary

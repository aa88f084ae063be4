"""Run one adapt job in a fresh Python process and read its summary.

A fresh process per run is what makes peak memory a run's own (the resident-set high-water mark
never goes down inside a process), and what keeps one run's failure from taking others down.
Sweeps and benchmarks both go through here.
"""

from __future__ import annotations

import collections
import os
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

import yaml

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
        failed before writing one (bad config, crash, timeout); ``exit_code`` is added.
    """
    config = {section: dict(values) for section, values in config.items()}
    config.setdefault("output", {})["dir"] = str(run_dir)
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        yaml.safe_dump(config, f)
        config_path = f.name
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    tail: collections.deque[str] = collections.deque(maxlen=20)  # the child's last words, for the error
    try:
        with subprocess.Popen(
            [sys.executable, "-m", "ecoadapt", "adapt", config_path],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        ) as proc:
            timer = threading.Timer(timeout_s, proc.kill) if timeout_s else None
            if timer:
                timer.start()
            assert proc.stderr is not None
            for line in proc.stderr:  # progress passes through as it comes
                tail.append(line)
                if stream_output:
                    sys.stderr.write(line)
                    sys.stderr.flush()
            code = proc.wait()
            timed_out = timer is not None and not timer.is_alive() and code != 0
            if timer:
                timer.cancel()
        if timed_out:
            tail.append(f"timed out after {timeout_s} s")
    finally:
        Path(config_path).unlink(missing_ok=True)
    err = "".join(tail)
    summary_path = run_dir / "summary.json"
    if summary_path.exists():
        summary: dict[str, Any] = read_json(summary_path)
    else:
        lines = [line for line in err.strip().splitlines() if line.strip()]
        error = lines[-1] if lines else f"exit status {code}"
        summary = RunSummary(status="failed", config=config, error=error).to_dict()
    summary["exit_code"] = code
    return summary

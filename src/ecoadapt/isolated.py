"""Run one adapt job in a fresh Python process and read its summary.

A fresh process per run is what makes peak memory a run's own (the resident-set high-water mark
never goes down inside a process), and what keeps one run's failure from taking others down.
Sweeps and benchmarks both go through here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml


def run_adapt(
    config: dict[str, Any], run_dir: Path, timeout_s: float | None = None, stream_output: bool = False
) -> dict[str, Any]:
    """Run ``ecoadapt adapt`` on ``config`` (nested sections) in a child process.

    Args:
        config: the run's config as nested plain data; ``output.dir`` is set to ``run_dir``.
        run_dir: the run directory to create.
        timeout_s: kill the child after this many seconds.
        stream_output: pass the child's stderr (progress) through instead of capturing it.

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
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "ecoadapt", "adapt", config_path],
            stdout=subprocess.PIPE,
            stderr=None if stream_output else subprocess.PIPE,
            text=True,
            timeout=timeout_s,
            env=env,
            check=False,
        )
        code, err = proc.returncode, (proc.stderr or "")
    except subprocess.TimeoutExpired:
        code, err = -1, f"timed out after {timeout_s} s"
    finally:
        Path(config_path).unlink(missing_ok=True)
    summary_path = run_dir / "summary.json"
    if summary_path.exists():
        summary: dict[str, Any] = json.loads(summary_path.read_text())
    else:
        lines = [line for line in err.strip().splitlines() if line.strip()]
        summary = {"status": "failed", "error": lines[-1] if lines else f"exit status {code}"}
    summary["exit_code"] = code
    return summary

"""What the run ran on, so that its numbers can be put in context and reproduced."""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import torch


def cpu_name() -> str:
    """The CPU model name (from /proc/cpuinfo on Linux, else the platform's word)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def package_version(package: str) -> str | None:
    """An installed distribution's version; None where it is not installed (ecoadapt run from
    a source tree on PYTHONPATH, say)."""
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


@functools.cache
def source_revision() -> str | None:
    """The git commit of the source tree ecoadapt runs from, with ``+dirty.<digest of the
    changes>`` when it has uncommitted ones; None when it is installed from a package (its
    version then says which code ran)."""
    here = Path(__file__).resolve().parents[1]  # the ecoadapt package folder
    git = ["git", "-C", str(here)]
    try:
        head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return None
        diff = subprocess.run([*git, "diff", "HEAD", "--", "."], capture_output=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    dirty = f"+dirty.{hashlib.sha256(diff).hexdigest()[:12]}" if diff else ""
    return head.stdout.strip() + dirty


@functools.cache
def platform_name() -> str:
    """``platform.platform()``, asked once: it runs ``uname -p`` in a child process."""
    return platform.platform()


def read_before_loading() -> None:
    """Ask now what needs a child process (git, uname), and keep the answers: a child forked
    while the model is loaded shares its pages for an instant, and a sampler summing a process
    tree's resident sets counts them twice (5.2 GiB for a 2.6 GiB 1.1B bf16-pure run)."""
    source_revision()
    platform_name()


def describe(device: torch.device) -> dict[str, Any]:
    """The environment part of summary.json: software versions, device and CPU."""
    env: dict[str, Any] = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": package_version("transformers"),
        "peft": package_version("peft"),
        "ecoadapt": package_version("ecoadapt"),
        "ecoadapt_source": source_revision(),
        "device": device.type,
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform_name(),
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    return env

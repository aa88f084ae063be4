"""What the run ran on, so that its numbers can be put in context and reproduced."""

from __future__ import annotations

import os
import platform
import sys
from importlib import metadata
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


def describe(device: torch.device) -> dict[str, Any]:
    """The environment part of summary.json: software versions, device and CPU."""
    env: dict[str, Any] = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": package_version("transformers"),
        "peft": package_version("peft"),
        "ecoadapt": package_version("ecoadapt"),
        "device": device.type,
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    return env

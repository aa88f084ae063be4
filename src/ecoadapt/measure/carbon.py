"""What model cards and compute statements say about energy, carbon and hardware (no torch).

One place for the conversions and the wording, so the card of a model and the paper's compute
statement never disagree: joules to kWh, the grid intensity used and where it came from, the
hardware in words, and how the energy was obtained (measured, or estimated and how).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ecoadapt.config import WORLD_GRID_G_CO2_PER_KWH, WORLD_GRID_SOURCE

JOULES_PER_KWH = 3.6e6


def kwh(joules: float) -> float:
    """Joules in kilowatt-hours."""
    return joules / JOULES_PER_KWH


@dataclass
class Grid:
    """The carbon intensity used (g CO2e per kWh) and where it came from."""

    g_per_kwh: float
    source: str

    def grams(self, joules: float) -> float:
        """Grams of CO2e of ``joules`` at this intensity."""
        return kwh(joules) * self.g_per_kwh


def grid(configured: float | None) -> Grid:
    """The configured intensity, or the world average (said so)."""
    if configured is not None:
        return Grid(configured, "measure.grid_g_co2_per_kwh (given by the user)")
    return Grid(WORLD_GRID_G_CO2_PER_KWH, WORLD_GRID_SOURCE)


def hardware(environment: dict[str, Any] | None, processes: int = 1) -> str:
    """The hardware in words: "1 x NVIDIA H200" or "AMD EPYC 9R14 (2 CPU cores)"."""
    env = environment or {}
    if not env:
        return "hardware not recorded"
    if env.get("device") == "cuda" and env.get("gpu"):
        return f"{processes} x {env['gpu']}"
    cpu = env.get("cpu") or "CPU"
    return f"{cpu} ({env.get('cpu_count', '?')} CPU cores)" + (f", {processes} processes" if processes > 1 else "")


def method_text(energy: dict[str, Any]) -> str:
    """How the energy was obtained, in words (measured by which meter, or estimated how)."""
    if energy.get("method") == "measured":
        return f"measured ({energy.get('meter')})"
    details = energy.get("details") or {}
    formula = details.get("formula") if isinstance(details, dict) else None
    return f"estimated ({energy.get('meter')}" + (f": {formula}" if formula else "") + ")"

"""The ``measure`` and ``budget`` sections of a run's config: how energy is metered, and the
limits a run stops at (their own module to keep config.py small; ``ecoadapt.config``
re-exports them)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

CPU_WATTS_PER_CORE = 7.5  # a busy x86 server core with its share of uncore: TDP / cores of common parts
MEMORY_WATTS_PER_GIB = 0.375  # DDR4/DDR5 DIMM power per GiB (about 3 W per 8 GiB module)
# The meters that measure (measure/meters.py builds each from its one factory table), and every
# value measure.energy takes (the Literal below is held to it by tests/test_docs.py).
MEASURED_METERS = ("nvml", "rapl")
ENERGY_CHOICES = ("auto", *MEASURED_METERS, "estimate", "off")


@dataclass
class MeasureConfig:
    """How energy is measured or estimated."""

    energy: Literal["auto", "nvml", "rapl", "estimate", "off"] = "auto"
    """Energy meter: nvml (NVIDIA GPU energy via Zeus, measured; pip install
    'ecoadapt[energy]'), rapl (CPU package and DRAM counters, measured), estimate (CPU time x
    watts per core + memory), auto (measured where the machine allows, else estimated, saying
    why), off."""
    cpu_watts_per_core: float = CPU_WATTS_PER_CORE
    """Estimator input: watts drawn by one fully busy CPU core (your CPU's TDP / cores is a
    fair value)."""
    memory_watts_per_gib: float = MEMORY_WATTS_PER_GIB
    """Estimator input: watts per GiB of resident memory."""
    idle_s: float = 0.0
    """Seconds to measure the machine's idle power before the run (0: skip); the summary then
    also reports energy above that idle baseline."""
    grid_g_co2_per_kwh: float | None = None
    """Carbon intensity of your electricity (g CO2e per kWh), to report grams of CO2e (model
    cards and compute statements assume the world average, saying so, when unset)."""
    location: str | None = None
    """Where the machine runs (e.g. "Quebec, Canada"), for the model card's co2_eq_emissions
    and the compute statement."""
    forecast: bool = True
    """Forecast the whole run's peak memory, time and joules from its own first 5 training steps
    (no extra process or step: a clock and a meter read after each of them), say it then, and
    put it beside the measured figures in summary.json. `ecoadapt plan` forecasts before any
    training instead, from trial steps in child processes. Single-process runs."""
    peak_flops: float | None = None
    """The device's peak FLOP/s in the run's precision, for MFU; default: measured by a short
    matmul benchmark (cached per device, dtype and thread count)."""


@dataclass
class BudgetConfig:
    """Limits a run stops at (checked after every optimizer step)."""

    energy_j: float | None = None
    """Stop after this many joules of training (as the energy meter counts them)."""
    time_s: float | None = None
    """Stop after this many seconds of training."""
    tokens: int | None = None
    """Stop after this many training tokens."""

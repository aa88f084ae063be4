"""Energy meters behind one small interface, and measurement windows over them.

A meter is a monotonic joule counter (``total_joules``) with a ``method`` (measured or
estimated) and a ``meter`` name; :class:`EnergyTracker` turns it into named windows
(``begin_window`` / ``end_window``, as Zeus does) that return a :class:`Measurement` whose fields
carry their units. Meters:

- ``nvml``: NVIDIA GPU energy through Zeus's ``ZeusMonitor`` (the NVML total-energy counter
  where the GPU has one, sampled power otherwise), measured. Zeus is an optional extra
  (``pip install 'ecoadapt[energy]'``): it pulls pandas and scikit-learn.
- ``rapl``: Intel/AMD CPU package (and DRAM, where exposed) energy from the Linux powercap
  sysfs counters, measured; counter wraparound is handled.
- ``estimate``: CPU seconds of this process and its children x watts per busy core, plus
  resident memory x watts per GiB over the wall time. Fine for comparing recipes on one
  machine; never reported as measured.

``auto`` takes the first meter that can read on this machine and says which it took and why the
others could not; a meter asked for by name that cannot read is an error, never a silent
fallback.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import psutil

from ecoadapt.config import CPU_WATTS_PER_CORE, MEMORY_WATTS_PER_GIB, MeasureConfig
from ecoadapt.errors import UserError

POWERCAP_ROOT = Path("/sys/class/powercap")


class Meter(Protocol):
    """A monotonic energy counter."""

    name: str
    method: str  # "measured" or "estimated"

    def total_joules(self) -> float:
        """Joules since the meter was created."""
        ...

    def describe(self) -> dict[str, Any]:
        """How the figure is obtained (formula, inputs, devices), for the summary."""
        ...


@dataclass
class Measurement:
    """Energy and time of one window.

    Attributes:
        joules: energy in J.
        seconds: wall time in s.
        method: "measured" or "estimated".
        meter: which meter produced it.
    """

    joules: float
    seconds: float
    method: str
    meter: str

    @property
    def watts(self) -> float:
        """Mean power over the window, W."""
        return self.joules / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        """The window for summary.json: joules (J), seconds (s), method, meter."""
        return {"joules": self.joules, "seconds": self.seconds, "method": self.method, "meter": self.meter}

    def plus(self, joules: float, seconds: float) -> Measurement:
        """This window with ``joules`` and ``seconds`` added (negative: taken away)."""
        return Measurement(self.joules + joules, self.seconds + seconds, self.method, self.meter)


class EstimateMeter:
    """Energy estimated from CPU time and resident memory: no hardware counter needed.

    joules = cpu_seconds(process tree) x cpu_watts_per_core
             + mean resident GiB x memory_watts_per_gib x wall_seconds
    """

    name = "cpu-time-estimate"
    method = "estimated"

    def __init__(
        self,
        cpu_watts_per_core: float = CPU_WATTS_PER_CORE,
        memory_watts_per_gib: float = MEMORY_WATTS_PER_GIB,
        process: psutil.Process | None = None,
    ) -> None:
        self.cpu_watts_per_core = cpu_watts_per_core
        self.memory_watts_per_gib = memory_watts_per_gib
        self.process = process or psutil.Process()
        self._cpu0 = self._cpu_seconds()
        self._last_wall = time.perf_counter()
        self._memory_joules = 0.0
        self.cpu_seconds = 0.0

    def _cpu_seconds(self) -> float:
        t = self.process.cpu_times()
        total = t.user + t.system + t.children_user + t.children_system
        for child in self.process.children(recursive=True):
            try:
                c = child.cpu_times()
                total += c.user + c.system
            except psutil.Error:  # a child that ended between listing and reading
                pass
        return total

    def total_joules(self) -> float:
        """Estimated joules since creation (memory power integrated between reads)."""
        now = time.perf_counter()
        gib = self.process.memory_info().rss / 2**30
        self._memory_joules += gib * self.memory_watts_per_gib * (now - self._last_wall)
        self._last_wall = now
        self.cpu_seconds = self._cpu_seconds() - self._cpu0
        return self.cpu_seconds * self.cpu_watts_per_core + self._memory_joules

    def describe(self) -> dict[str, Any]:
        """The formula and its inputs, so that a user can redo the arithmetic."""
        return {
            "formula": "cpu_seconds x cpu_watts_per_core + resident_GiB x memory_watts_per_gib x wall_seconds",
            "cpu_watts_per_core": self.cpu_watts_per_core,
            "memory_watts_per_gib": self.memory_watts_per_gib,
            "cpu_seconds": self.cpu_seconds,
            "memory_joules": self._memory_joules,
        }


@dataclass
class _RaplDomain:
    name: str
    path: Path
    max_uj: int
    last_uj: int
    total_uj: int = 0


class RaplMeter:
    """CPU package and DRAM energy from the powercap counters (Intel RAPL, AMD RAPL), measured.

    Reads the top-level ``intel-rapl:N`` (package) zones and their ``dram`` sub-zones; core and
    uncore sub-zones are skipped because the package already contains them. Each counter wraps
    at ``max_energy_range_uj``; a reading below the previous one adds the range back.
    """

    name = "rapl"
    method = "measured"

    def __init__(self, root: Path = POWERCAP_ROOT) -> None:
        self.domains: list[_RaplDomain] = []
        for zone in sorted(root.glob("intel-rapl:*")):
            if zone.name.count(":") == 1 or _read(zone / "name", "").startswith("dram"):
                energy = zone / "energy_uj"
                try:
                    first = int(energy.read_text())
                    max_uj = int(_read(zone / "max_energy_range_uj", str(2**32)))
                except (OSError, ValueError) as e:
                    raise RuntimeError(f"cannot read {energy} ({e}); reading RAPL usually needs root") from e
                self.domains.append(_RaplDomain(_read(zone / "name", zone.name), energy, max_uj, first))
        if not self.domains:
            raise RuntimeError(f"no RAPL zones under {root}")

    def total_joules(self) -> float:
        """Measured joules since creation, summed over package and DRAM zones."""
        for d in self.domains:
            now = int(d.path.read_text())
            delta = now - d.last_uj
            if delta < 0:  # the counter wrapped around
                delta += d.max_uj
            d.total_uj += delta
            d.last_uj = now
        return sum(d.total_uj for d in self.domains) / 1e6

    def describe(self) -> dict[str, Any]:
        """The zones read."""
        return {"zones": [d.name for d in self.domains]}


class ZeusGpuMeter:
    """GPU energy from Zeus's ZeusMonitor, measured.

    ZeusMonitor measures windows; a running total comes from chaining them: each read opens the
    next window before it closes the current one (Zeus allows overlapping windows), so no
    interval is lost or counted twice. Reads do not synchronise CUDA (that would stall the
    training loop at every budget check); work still queued is counted by the next read.
    """

    name = "zeus-nvml"
    method = "measured"

    def __init__(self, gpu_indices: list[int]) -> None:
        try:
            from zeus.monitor import ZeusMonitor
        except ImportError as e:
            raise RuntimeError("the NVML meter needs Zeus: pip install 'ecoadapt[energy]'") from e
        try:
            self.monitor = ZeusMonitor(gpu_indices=gpu_indices, cpu_indices=[])
        except Exception as e:  # Zeus raises its own types for "no NVML", "no GPU"
            raise RuntimeError(f"Zeus cannot read NVML ({type(e).__name__}: {e})") from e
        self.gpu_indices = gpu_indices
        self._reads = 0
        self._total = 0.0
        self.monitor.begin_window(self._key())

    def _key(self) -> str:
        return f"ecoadapt-{self._reads}"

    def total_joules(self) -> float:
        """Measured GPU joules since creation, summed over the metered GPUs."""
        current = self._key()
        self._reads += 1
        self.monitor.begin_window(self._key(), sync_execution=False)
        measurement = self.monitor.end_window(current, sync_execution=False)
        self._total += float(sum(measurement.gpu_energy.values()))
        return self._total

    def describe(self) -> dict[str, Any]:
        """The GPUs metered."""
        return {"library": "zeus", "gpu_indices": self.gpu_indices}


def _read(path: Path, default: str) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return default


@dataclass
class MeterChoice:
    """The meter a run uses and why (what ``auto`` tried and could not use)."""

    meter: Meter | None
    notes: list[str] = field(default_factory=list)


def choose(
    kind: str,
    cpu_watts_per_core: float = CPU_WATTS_PER_CORE,
    memory_watts_per_gib: float = MEMORY_WATTS_PER_GIB,
    powercap_root: Path = POWERCAP_ROOT,
    gpu_indices: list[int] | None = None,
) -> MeterChoice:
    """Build the meter that ``measure.energy`` names.

    Args:
        kind: auto, nvml, rapl, estimate or off.
        gpu_indices: the GPUs the run uses (None on CPU); auto meters them with NVML.

    Raises:
        UserError: a meter named explicitly that cannot read on this machine.
    """
    if kind == "off":
        return MeterChoice(None, ["energy: off (measure.energy = off)"])
    if kind == "estimate":
        return MeterChoice(EstimateMeter(cpu_watts_per_core, memory_watts_per_gib))
    builders: dict[str, Callable[[], Meter]] = {
        "nvml": lambda: ZeusGpuMeter(gpu_indices or [0]),
        "rapl": lambda: RaplMeter(powercap_root),
    }
    if kind in builders:
        try:
            return MeterChoice(builders[kind]())
        except RuntimeError as e:
            raise UserError(f"measure.energy = {kind}: {e}; use auto or estimate") from None
    # auto: a GPU run is metered on its GPUs; a CPU run on the CPU package.
    order = ["nvml"] if gpu_indices else ["rapl"]
    notes = []
    for name in order:
        try:
            return MeterChoice(builders[name]())
        except RuntimeError as e:
            notes.append(f"{name}: {e}")
    what = "CPU time (the GPU's own energy is not counted)" if gpu_indices else "CPU time"
    notes = [f"energy: no measured meter on this machine ({'; '.join(notes)}); estimating from {what} instead"]
    return MeterChoice(EstimateMeter(cpu_watts_per_core, memory_watts_per_gib), notes)


class EnergyTracker:
    """Named measurement windows over one meter (which may be None: energy off).

    A window can be declared *within* another (periodic evaluation within training): when the
    inner one ends, its joules and seconds are taken out of the outer one, so that each figure is
    its own window's. A name used for several windows keeps their sum.
    """

    def __init__(self, meter: Meter | None) -> None:
        self.meter = meter
        self._open: dict[str, tuple[float, float]] = {}
        self._within: dict[str, str] = {}  # inner window -> the open window it runs inside
        self._taken: dict[str, tuple[float, float]] = {}  # outer -> (J, s) of inner windows so far
        self.windows: dict[str, Measurement] = {}
        self.idle_watts: float | None = None

    @classmethod
    def for_config(
        cls,
        measure: MeasureConfig,
        device_type: str,
        device_index: int | None,
        local_rank: int,
        log: Callable[[str], None],
    ) -> EnergyTracker:
        """The run's tracker over the meter measure.energy names (notes go to ``log``).

        Args:
            device_type: "cuda" meters the run's GPU; "cpu" the CPU package.
            device_index: the GPU's index (cuda).
            local_rank: this process's rank on its machine: one CPU package is counted once,
                by local rank 0.
        """
        chosen = choose(
            measure.energy,
            measure.cpu_watts_per_core,
            measure.memory_watts_per_gib,
            gpu_indices=[device_index or 0] if device_type == "cuda" else None,
        )
        for note in chosen.notes:
            log(note)
        meter = chosen.meter
        if isinstance(meter, RaplMeter) and local_rank != 0:
            meter = None  # one CPU package, one meter: local rank 0 counts it for the machine
        return cls(meter)

    @property
    def method(self) -> str:
        """ "measured", "estimated" or "off"."""
        return self.meter.method if self.meter is not None else "off"

    @property
    def meter_name(self) -> str:
        """The meter's name, or "off"."""
        return self.meter.name if self.meter is not None else "off"

    def total_joules(self) -> float:
        """Joules so far (0 when energy is off)."""
        return self.meter.total_joules() if self.meter is not None else 0.0

    def begin_window(self, name: str, within: str | None = None) -> None:
        """Start the window ``name``; ``within``: an open window this one's figures come out of."""
        self._open[name] = (self.total_joules(), time.perf_counter())
        if within is not None:
            self._within[name] = within

    def end_window(self, name: str) -> Measurement:
        """End the window ``name`` and return its own measurement (inner windows taken out)."""
        joules0, t0 = self._open.pop(name)
        taken_j, taken_s = self._taken.pop(name, (0.0, 0.0))
        m = Measurement(
            self.total_joules() - joules0 - taken_j,
            time.perf_counter() - t0 - taken_s,
            self.method,
            self.meter_name,
        )
        self.windows[name] = self.windows[name].plus(m.joules, m.seconds) if name in self.windows else m
        outer = self._within.pop(name, None)
        if outer is not None and outer in self._open:
            j, sec = self._taken.get(outer, (0.0, 0.0))
            self._taken[outer] = (j + m.joules, sec + m.seconds)
        return m

    def running(self, name: str) -> float:
        """Joules of window ``name`` so far: its closed parts plus the open one up to now, inner
        windows taken out (what a budget checks while training runs)."""
        kept = self.windows[name].joules if name in self.windows else 0.0
        if name in self._open:
            kept += self.total_joules() - self._open[name][0] - self._taken.get(name, (0.0, 0.0))[0]
        return kept

    def snapshot(self) -> dict[str, tuple[float, float]]:
        """(joules, seconds) per window so far, open ones up to now: what a checkpoint keeps so
        a resumed run reports the energy of every part of it."""
        out = {name: (m.joules, m.seconds) for name, m in self.windows.items()}
        now_j, now_t = self.total_joules(), time.perf_counter()
        for name, (joules0, t0) in self._open.items():
            kept = out.get(name, (0.0, 0.0))
            taken_j, taken_s = self._taken.get(name, (0.0, 0.0))
            out[name] = (kept[0] + now_j - joules0 - taken_j, kept[1] + now_t - t0 - taken_s)
        return out

    def carry(self, prior: dict[str, tuple[float, float]]) -> None:
        """Start from the windows of the interrupted runs this one resumes (see snapshot)."""
        for window, (joules, seconds) in prior.items():
            kept = self.windows.get(window, Measurement(0.0, 0.0, self.method, self.meter_name))
            self.windows[window] = kept.plus(float(joules), float(seconds))

    def measure_idle(self, seconds: float) -> float:
        """Idle power (W) over ``seconds`` of sleep; kept out of the run's windows."""
        self.begin_window("idle")
        time.sleep(seconds)
        idle = self.end_window("idle")
        del self.windows["idle"]
        self.idle_watts = idle.watts
        return idle.watts

    def summary(self, grid_g_co2_per_kwh: float | None = None) -> dict[str, Any] | None:
        """The energy part of summary.json for this process, or None when energy is off.

        Args:
            grid_g_co2_per_kwh: carbon intensity, to add grams of CO2e.
        """
        if self.meter is None:
            return None
        out: dict[str, Any] = {
            "method": self.meter.method,
            "meter": self.meter.name,
            "phases": {k: {"joules": m.joules, "seconds": m.seconds} for k, m in self.windows.items()},
            "details": self.meter.describe(),
            "idle_watts": self.idle_watts,
            "grid_g_co2_per_kwh": grid_g_co2_per_kwh,
        }
        return with_totals(out)


def with_totals(energy: dict[str, Any]) -> dict[str, Any]:
    """Recompute the figures derived from ``energy["phases"]``: total joules, watts per phase,
    joules above idle (idle watts x the wall seconds of all phases), grams of CO2e.

    Call it after any change to the phases (ranks summed, the task's window added), so a
    derived figure never disagrees with the phases it comes from.
    """
    phases = energy["phases"]
    for m in phases.values():
        m["watts"] = m["joules"] / m["seconds"] if m["seconds"] > 0 else 0.0
    energy["joules"] = sum(m["joules"] for m in phases.values())
    seconds = sum(m["seconds"] for m in phases.values())
    energy.pop("joules_above_idle", None)
    energy.pop("co2e_g", None)
    if energy.get("idle_watts") is not None:
        # Energy the machines would have drawn anyway, idle, over the same seconds.
        energy["joules_above_idle"] = energy["joules"] - energy["idle_watts"] * seconds
    if energy.get("grid_g_co2_per_kwh") is not None:
        energy["co2e_g"] = energy["joules"] / 3.6e6 * energy["grid_g_co2_per_kwh"]
    return energy


def combine_ranks(per_rank: list[dict[str, Any] | None]) -> dict[str, Any] | None:
    """The job's energy from every rank's :meth:`EnergyTracker.summary` (None: not metered).

    Joules add up over ranks (each meters its own GPU, or local rank 0 its CPU package); the
    seconds of a phase are wall time, counted once (the slowest rank's); idle watts add up
    over the metered ranks, so joules above idle and CO2e are the job's, recomputed from the
    sums.
    """
    metered = [e for e in per_rank if e is not None]
    if not metered:
        return None
    if len(per_rank) == 1:
        return metered[0]
    names = list(dict.fromkeys(name for e in metered for name in e["phases"]))
    idle = [e["idle_watts"] for e in metered if e.get("idle_watts") is not None]
    job = {
        **metered[0],
        "phases": {
            name: {
                "joules": sum(e["phases"].get(name, {}).get("joules", 0.0) for e in metered),
                "seconds": max(e["phases"].get(name, {}).get("seconds", 0.0) for e in metered),
            }
            for name in names
        },
        "idle_watts": sum(idle) if idle else None,
        "per_rank_joules": [e["joules"] if e is not None else None for e in per_rank],
        "ranks_metered": len(metered),
    }
    return with_totals(job)

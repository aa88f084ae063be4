"""Energy meters behind one small interface: a monotonic joule counter with a label.

- ``nvml``: NVIDIA GPU energy through Zeus's ``ZeusMonitor`` (the NVML total-energy counter
  where the GPU has one, Volta and later; polled power on older GPUs, labelled "sampled"),
  measured. Zeus is an optional extra (``pip install 'ecoadapt[energy]'``).
- ``rapl``: Intel/AMD CPU package (and DRAM, where exposed) energy from the Linux powercap
  sysfs counters, measured; counter wraparound is handled.
- ``estimate``: CPU seconds of this process and its children x watts per busy core, plus
  resident memory x watts per GiB over the wall time. Fine for comparing recipes on one
  machine; never reported as measured.

``auto`` takes the first meter that can read on this machine and says which it took and why the
others could not; a meter asked for by name that cannot read is an error, never a silent
fallback. Each meter says what it covers (``covers``): a GPU meter does not count the CPU.
"""

from __future__ import annotations

import contextlib
import threading
import time
import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import psutil

from ecoadapt.config.measure import CPU_WATTS_PER_CORE, MEASURED_METERS, MEMORY_WATTS_PER_GIB
from ecoadapt.core.errors import UserError

POWERCAP_ROOT = Path("/sys/class/powercap")


class Meter(Protocol):
    """A monotonic energy counter."""

    name: str
    method: str  # "measured" or "estimated"
    covers: str  # what the joules are of: "GPU", "CPU package and DRAM", ...

    def total_joules(self) -> float:
        """Joules since the meter was created."""
        ...

    def describe(self) -> dict[str, Any]:
        """How the figure is obtained (formula, inputs, devices), for the summary."""
        ...


class EstimateMeter:
    """Energy estimated from CPU time and resident memory: no hardware counter needed.

    joules = cpu_seconds(process tree) x cpu_watts_per_core
             + mean resident GiB x memory_watts_per_gib x wall_seconds
    """

    name = "cpu-time-estimate"
    method = "estimated"
    covers = "CPU time and resident memory of this process tree (an estimate)"

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


# RAPL counters wrap at max_energy_range_uj; read at least four times per wrap at this power, a
# wrap is never missed (a 32-bit counter of µJ wraps every 8.6 s at 500 W).
RAPL_MAX_WATTS = 500.0
RAPL_SAMPLE_S = (0.5, 60.0)  # the background reads' interval, bounded


class RaplMeter:
    """CPU package and DRAM energy from the powercap counters (Intel RAPL, AMD RAPL), measured.

    Counts each joule once, as Zeus and CodeCarbon do: the ``package-N`` zones and their
    ``dram`` sub-zones; ``psys`` (the platform zone of laptops and desktops, which already holds
    the package) only where it is the only zone; core and uncore sub-zones never (the package
    holds them). Each counter wraps at ``max_energy_range_uj``: a reading below the previous one
    adds the range back, and a background thread reads the counters often enough (see
    RAPL_MAX_WATTS) that a long window cannot hide a wrap between two reads.
    """

    name = "rapl"
    method = "measured"
    covers = "CPU package and DRAM (every process on the package)"

    def __init__(self, root: Path = POWERCAP_ROOT, sample: bool = True) -> None:
        self.domains: list[_RaplDomain] = []
        self._lock = threading.Lock()
        top = [z for z in sorted(root.glob("intel-rapl:*")) if z.name.count(":") == 1]
        packages = [z for z in top if not _read(z / "name", "").startswith("psys")]
        chosen = packages or top  # psys alone where nothing else is exposed
        drams = [z for z in sorted(root.glob("intel-rapl:*:*")) if _read(z / "name", "").startswith("dram")]
        for zone in [*chosen, *(d for d in drams if packages)]:
            energy = zone / "energy_uj"
            try:
                first = int(energy.read_text())
                max_uj = int(_read(zone / "max_energy_range_uj", str(2**32)))
            except (OSError, ValueError) as e:
                raise RuntimeError(f"cannot read {energy} ({e}); reading RAPL usually needs root") from e
            self.domains.append(_RaplDomain(_read(zone / "name", zone.name), energy, max_uj, first))
        if not self.domains:
            raise RuntimeError(f"no RAPL zones under {root}")
        wrap_s = min(d.max_uj for d in self.domains) / 1e6 / RAPL_MAX_WATTS
        self.sample_s = min(max(wrap_s / 4, RAPL_SAMPLE_S[0]), RAPL_SAMPLE_S[1])
        if sample:
            _start_sampling(self)

    def total_joules(self) -> float:
        """Measured joules since creation, summed over the zones counted."""
        with self._lock:
            for d in self.domains:
                now = int(d.path.read_text())
                delta = now - d.last_uj
                if delta < 0:  # the counter wrapped around
                    delta += d.max_uj
                d.total_uj += delta
                d.last_uj = now
            return sum(d.total_uj for d in self.domains) / 1e6

    def describe(self) -> dict[str, Any]:
        """The zones read, and how often they are sampled in the background (s)."""
        return {"zones": [d.name for d in self.domains], "sample_s": round(self.sample_s, 2)}


def _start_sampling(meter: RaplMeter) -> None:
    """Read ``meter`` every ``sample_s`` in a daemon thread, until the meter is gone."""
    ref = weakref.ref(meter)
    interval = meter.sample_s

    def sample() -> None:
        while True:
            time.sleep(interval)
            alive = ref()
            if alive is None:
                return
            with contextlib.suppress(OSError, ValueError):  # a read that failed once: the next one counts it
                alive.total_joules()
            del alive

    threading.Thread(target=sample, name="ecoadapt-rapl-sampler", daemon=True).start()


class ZeusGpuMeter:
    """GPU energy from Zeus's ZeusMonitor, measured.

    ZeusMonitor measures windows; a running total comes from chaining them: each read opens the
    next window before it closes the current one (Zeus allows overlapping windows), so no
    interval is lost or counted twice. Reads do not synchronise CUDA (that would stall the
    training loop at every budget check); work still queued is counted by the next read.

    NVML's energy counter moves in steps (a window of 0.08 s read 0 J on an H200 while the
    next read counted it): a short phase can read 0 J and its energy lands in the next one.
    Totals are exact; Zeus's warning about it (and its per-window power approximation, which
    would count that energy twice in a chain) is left off, and describe() says so.
    """

    name = "zeus-nvml"
    method = "measured"
    covers = "GPU"

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
        self.sampled = [i for i in gpu_indices if not _has_energy_counter(self.monitor, i)]
        if self.sampled:
            # No energy counter (GPUs before Volta): Zeus integrates polled power, so a window
            # shorter than two samples reads 0 J and time between reads is not counted.
            self.name = "zeus-nvml-sampled"
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
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_ZEUS_ZERO_WINDOW)
            measurement = self.monitor.end_window(current, sync_execution=False)
        self._total += float(sum(measurement.gpu_energy.values()))
        return self._total

    def describe(self) -> dict[str, Any]:
        """The GPUs metered, and which of them only by sampled power."""
        out: dict[str, Any] = {
            "library": "zeus",
            "gpu_indices": self.gpu_indices,
            "resolution": "NVML's energy counter moves in steps: a phase under about 0.1 s can read 0 J, "
            "its energy then counted in the next phase (totals are exact)",
        }
        if self.sampled:
            out["sampled_gpus"] = self.sampled
            out["note"] = (
                "no energy counter on these GPUs (before Volta): power polled and integrated; windows "
                "shorter than two samples read 0 J and gaps between reads are not counted"
            )
        return out


# The start of Zeus's warning for a window shorter than the counter's update period.
_ZEUS_ZERO_WINDOW = "The energy consumption of one or more GPUs was measured as zero"


def _has_energy_counter(monitor: Any, index: int) -> bool:
    """Whether Zeus reads GPU ``index``'s energy counter (True where it cannot say)."""
    gpus = getattr(monitor, "gpus", None)
    for name in ("supports_get_total_energy_consumption", "supportsGetTotalEnergyConsumption"):
        ask = getattr(gpus, name, None)
        if callable(ask):
            return bool(ask(index))
    return True


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


def measured_meters(gpu_indices: list[int] | None, powercap_root: Path) -> dict[str, Callable[[], Meter]]:
    """The one factory table of the meters that measure, by ``measure.energy`` name."""
    builders: dict[str, Callable[[], Meter]] = {
        "nvml": lambda: ZeusGpuMeter(gpu_indices or [0]),
        "rapl": lambda: RaplMeter(powercap_root),
    }
    assert tuple(builders) == MEASURED_METERS  # the config's list of them
    return builders


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
    builders = measured_meters(gpu_indices, powercap_root)
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


def check(kind: str, gpu_indices: list[int] | None = None, powercap_root: Path = POWERCAP_ROOT) -> str | None:
    """Whether the meter ``kind`` (nvml, rapl) builds and reads here: None, or why not.

    Builds the real meter and reads it twice, as a run would: importing its library is not
    enough (NVML access, MIG slices, powercap permissions).
    """
    try:
        meter = measured_meters(gpu_indices, powercap_root)[kind]()
        meter.total_joules()
        meter.total_joules()
    except Exception as e:  # any failure means: this meter cannot be used here
        return f"{type(e).__name__}: {e}"
    return None

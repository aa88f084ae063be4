"""Measurement windows over an energy meter, and the job's energy from every rank's.

:class:`EnergyTracker` turns a meter (see :mod:`ecoadapt.measure.meters`) into named windows
(``begin_window`` / ``end_window``, as Zeus does) that return a :class:`Measurement` whose fields
carry their units; windows nest, so each figure is its own window's. Where the main meter is a
GPU's and the CPU's RAPL counters are readable too, the CPU's joules are reported beside the
GPU's (``beside``), each labelled with what it covers.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ecoadapt.config import MeasureConfig
from ecoadapt.measure import carbon, meters
from ecoadapt.measure.meters import Meter, RaplMeter, ZeusGpuMeter, choose


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
        self.beside: dict[str, Meter] = {}  # meters of what the main one leaves out
        self._beside_start: dict[str, float] = {}
        self.not_covered: str | None = None  # what no meter here counts

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
        tracker = cls(meter)
        if isinstance(meter, ZeusGpuMeter) and local_rank == 0:
            try:  # the GPU meter leaves the CPU and DRAM out: count them too where RAPL is readable
                tracker.beside = {"rapl": RaplMeter(meters.POWERCAP_ROOT)}
                tracker._beside_start = {"rapl": tracker.beside["rapl"].total_joules()}
            except RuntimeError as e:
                tracker.not_covered = f"CPU and DRAM (RAPL not readable: {e})"
        return tracker

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
            "covers": self.meter.covers,
            "phases": {k: {"joules": m.joules, "seconds": m.seconds} for k, m in self.windows.items()},
            "details": self.meter.describe(),
            "idle_watts": self.idle_watts,
            "grid_g_co2_per_kwh": grid_g_co2_per_kwh,
        }
        if self.beside:
            out["beside"] = {
                name: {
                    "joules": m.total_joules() - self._beside_start[name],
                    "method": m.method,
                    "meter": m.name,
                    "covers": m.covers,
                    "window": "the whole run (every phase), not included in joules",
                }
                for name, m in self.beside.items()
            }
        if self.not_covered:
            out["not_covered"] = self.not_covered
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
        energy["co2e_g"] = carbon.kwh(energy["joules"]) * energy["grid_g_co2_per_kwh"]
    energy["overhead"] = overhead(phases, energy["joules"])
    return energy


# Windows of the tool's own work: neither training, nor the evaluation and task the user asked
# for, nor loading and saving. Their share of a run is reported, and kept small.
OVERHEAD_WINDOWS = ("forecast", "peak_flops", "precision_checks")


def overhead(phases: dict[str, dict[str, float]], total_joules: float) -> dict[str, Any]:
    """The tool's own cost in a run: joules, seconds, its share of the run's joules, and which
    windows (``OVERHEAD_WINDOWS``) it was spent in."""
    own = {name: phases[name] for name in OVERHEAD_WINDOWS if name in phases}
    joules = sum(m["joules"] for m in own.values())
    return {
        "joules": joules,
        "seconds": sum(m["seconds"] for m in own.values()),
        "share": joules / total_joules if total_joules > 0 else 0.0,
        "windows": {name: m["joules"] for name, m in own.items()},
    }


def with_training_figures(job: dict[str, Any], tokens: int, loss_gain: float | None = None) -> dict[str, Any]:
    """Add what training's window gives per unit of work: ``train_joules`` (J),
    ``mj_per_token`` (mJ per training token, the headline of what a recipe spends),
    ``tokens_per_joule`` and ``joules_per_loss_point`` (J per nat of held-out loss gained)."""
    train_joules = job["phases"].get("train", {}).get("joules", 0.0)
    job["train_joules"] = train_joules
    job["mj_per_token"] = 1000.0 * train_joules / tokens if tokens > 0 and train_joules > 0 else None
    job["tokens_per_joule"] = tokens / train_joules if train_joules > 0 else None
    gained = loss_gain is not None and loss_gain > 0 and train_joules > 0
    job["joules_per_loss_point"] = train_joules / loss_gain if gained and loss_gain else None
    return job


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
    beside = [e["beside"] for e in metered if e.get("beside")]
    if beside:  # each machine's CPU, counted by its local rank 0: the job's is their sum
        job["beside"] = {
            name: {**beside[0][name], "joules": sum(b[name]["joules"] for b in beside if name in b)}
            for name in beside[0]
        }
    return with_totals(job)

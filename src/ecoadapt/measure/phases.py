"""Phase windows: energy, peak memory, wall time and the compile clock, opened and closed together.

Each phase of a run (training, evaluation, saving, the task, a forecast) is measured in a window
of its own. :meth:`Phases.window` is a context manager, so a window closes on every way out of
its phase, an exception included, and a new phase cannot forget half of the pairing. Windows
nest: an inner window's joules and seconds are taken out of the outer one's (``within``), and
memory peaks are kept apart (see :class:`~ecoadapt.measure.memory.MemoryWindows`).

    phases = Phases(tracker, MemoryWindows(device))
    with phases.window("train", clock=compiled) as train:
        ...
    train.energy.joules, train.peaks["peak"], train.seconds
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

from ecoadapt.measure.energy import EnergyTracker, Measurement
from ecoadapt.measure.memory import MemoryWindows


class CompileClock(Protocol):
    """What counts compile seconds inside a window (``model.compiling.Compiled``)."""

    def begin_training(self) -> None:
        """The window starts: compiling from here on is this window's."""

    def end_training(self) -> None:
        """The window ends."""


@dataclass
class PhaseFigures:
    """One window's figures, filled in when it closes.

    Attributes:
        name: the window's (energy) name.
        energy: its joules and seconds, inner windows taken out (None: no energy window).
        peaks: its peak memory in bytes, ``peak`` (and ``reserved`` on CUDA); None: not measured.
        seconds: its wall time in s, inner windows included.
    """

    name: str
    energy: Measurement | None = None
    peaks: dict[str, int] | None = None
    seconds: float = 0.0


class Phases:
    """The windows of one process: an energy tracker and (optionally) memory windows."""

    def __init__(self, tracker: EnergyTracker, memory: MemoryWindows | None = None) -> None:
        self.tracker = tracker
        self.memory = memory

    @contextlib.contextmanager
    def window(
        self,
        name: str,
        within: str | None = None,
        memory: str | None = "",
        clock: CompileClock | None = None,
        energy: bool = True,
    ) -> Iterator[PhaseFigures]:
        """Measure the body as the window ``name``; the figures are set on the yielded object on exit.

        Args:
            name: the energy window's name (a name used again adds to it).
            within: an open energy window this one's joules and seconds are taken out of.
            memory: the memory window's name ("": the same as ``name``; None: no memory window).
            clock: a compile clock that counts compile seconds inside this window.
            energy: whether to open an energy window (False: memory and time alone).
        """
        figures = PhaseFigures(name)
        memory_name = name if memory == "" else memory
        measure_memory = self.memory is not None and memory_name is not None
        start = time.perf_counter()
        if energy:
            self.tracker.begin_window(name, within=within)
        if measure_memory:
            assert self.memory is not None and memory_name is not None
            self.memory.begin(memory_name)
        if clock is not None:
            clock.begin_training()
        try:
            yield figures
        finally:  # closed in the reverse order of opening, whatever happened inside
            if clock is not None:
                clock.end_training()
            if measure_memory:
                assert self.memory is not None and memory_name is not None
                figures.peaks = self.memory.end(memory_name)
            if energy:
                figures.energy = self.tracker.end_window(name)
            figures.seconds = time.perf_counter() - start

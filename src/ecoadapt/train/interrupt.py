"""SIGTERM, SIGINT and SIGHUP during training: finish the step, checkpoint, exit cleanly.

Preemptible machines and batch schedulers (Slurm, Kubernetes) send SIGTERM and wait a grace
period before SIGKILL; Ctrl-C sends SIGINT; a closed terminal or ssh session sends SIGHUP (the
run then goes on to its checkpoint without the terminal). Each sets a flag that the loop reads after its
current optimizer step, so the checkpoint it writes is a consistent step boundary.

Signals often arrive in pairs: Slurm's scancel and a terminal's Ctrl-C reach every process of
the group, and torchrun forwards what it receives to its workers once more. Signals within
``COALESCE_S`` of the first are therefore the same request. A later one acts as it normally
would: a user pressing Ctrl-C again after a pause gets out at once, and the atomic checkpoint
writes leave nothing torn.
"""

from __future__ import annotations

import signal
import threading
import time
from types import FrameType, TracebackType
from typing import Any

from ecoadapt.core import processes

SIGNALS = processes.FORWARDED  # the one list of the signals that ask a run to stop
COALESCE_S = 2.0  # seconds within which repeated signals are one request


class Interrupts:
    """Context manager that turns the first SIGTERM, SIGINT or SIGHUP into a flag.

    Attributes:
        received: the signal number received, or None.
    """

    def __init__(self) -> None:
        self.received: int | None = None
        self._at = 0.0
        self._previous: dict[int, Any] = {}

    @property
    def name(self) -> str | None:
        """The received signal's name (e.g. "SIGTERM"), or None."""
        return signal.Signals(self.received).name if self.received is not None else None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        now = time.monotonic()
        if signum == signal.SIGHUP:
            processes.detach_from_terminal()
        if self.received is None:
            self.received, self._at = signum, now
            return
        if now - self._at > COALESCE_S:  # asked again, later: stop now, the usual way
            self._restore()
            signal.raise_signal(signum)

    def _restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def __enter__(self) -> Interrupts:
        if threading.current_thread() is threading.main_thread():  # Python allows handlers only there
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        self._restore()

    def name_if_received(self) -> str | None:
        """The received signal's name, or None: a ``stop`` callback between units of work."""
        return self.name

    def check(self, _result: object = None) -> str | None:
        """A should_stop callback: "interrupted" once a signal has arrived."""
        return "interrupted" if self.received is not None else None

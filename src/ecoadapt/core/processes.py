"""Child processes that signals and timeouts reach whole.

Every process ecoadapt starts (a sweep point, torchrun and its workers, the plan's trial steps)
runs in a process group of its own. A SIGTERM, SIGINT or SIGHUP sent to ecoadapt is passed on to the
whole group (each adapt process then checkpoints and exits as interrupted), and a timeout stops
the whole group: SIGTERM first, SIGKILL after a grace period. A child's grandchildren are never
left running behind it.
"""

from __future__ import annotations

import collections
import contextlib
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

# The signals that ask a run to stop: each adapt process checkpoints and exits as interrupted on
# them, and a parent passes them on to its children's groups. SIGHUP is a closed terminal or ssh
# session: the run goes on to its checkpoint without the terminal (see detach_from_terminal).
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
PR_SET_PDEATHSIG = 1  # prctl(2): the signal a process gets when its parent dies
READER_JOIN_S = 5.0  # after the child has gone, how long its output is still read
# Set by run_child in its child's environment: the pid of the ecoadapt process that started it.
# An ecoadapt child reads it at start (follow_parent) and takes SIGTERM when that process dies,
# however it dies: a sweep killed outright (the OOM killer) no longer leaves its point running.
PARENT_ENV = "ECOADAPT_PARENT_PID"
GRACE_S = 30.0  # between the SIGTERM of a timeout and the SIGKILL: time to write a checkpoint


@dataclass
class ChildResult:
    """How a child ended.

    Attributes:
        code: its exit status (negative: the signal that ended it, as subprocess reports it).
        forwarded: the first signal ecoadapt received and passed on to it, if any.
        timed_out: whether the timeout stopped it.
        tail: its last lines of standard error (when captured).
    """

    code: int
    forwarded: int | None = None
    timed_out: bool = False
    tail: list[str] = field(default_factory=list)

    @property
    def exit_status(self) -> int:
        """The status a shell gives it: 128 + the signal's number when a signal ended it."""
        if self.forwarded is not None:
            return 128 + self.forwarded
        return 128 - self.code if self.code < 0 else self.code


def stop_group(proc: subprocess.Popen[Any], grace_s: float = GRACE_S) -> None:
    """SIGTERM to the child's process group, then SIGKILL to whatever of its process tree is
    still there after ``grace_s`` (torchrun starts each worker in a session of its own: a
    group's signal does not reach them, so the tree is taken before anything is signalled)."""
    import psutil

    try:
        tree = psutil.Process(proc.pid).children(recursive=True)
    except psutil.Error:
        tree = []
    try:
        os.killpg(proc.pid, signal.SIGTERM)  # each adapt process checkpoints on it
    except ProcessLookupError:
        return
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=grace_s)
    _kill_stragglers(proc)
    for child in tree:
        with contextlib.suppress(psutil.Error):
            child.kill()
    proc.wait()


def _kill_stragglers(proc: subprocess.Popen[Any]) -> None:
    """The child has gone: anything left in its group (a grandchild) goes too."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


def run_child(
    cmd: list[str],
    env: dict[str, str] | None = None,
    timeout_s: float | None = None,
    capture_stderr: bool = False,
    on_line: Callable[[str], None] | None = None,
    grace_s: float = GRACE_S,
    stdout: Any = None,
    follow: bool = False,
) -> ChildResult:
    """Run ``cmd`` in a process group of its own until it ends; signals and the timeout reach all of it.

    Args:
        cmd: the command.
        env: its environment (default: this process's).
        timeout_s: stop the group after this many seconds (SIGTERM, then SIGKILL after ``grace_s``).
        capture_stderr: keep its last lines of standard error (``tail``), passing each to ``on_line``.
        stdout: where its standard output goes (default: this process's).
        follow: ``cmd`` is an ecoadapt command: it takes SIGTERM when this process dies
            (see :func:`follow_parent`).
    """
    tail: collections.deque[str] = collections.deque(maxlen=20)
    forwarded: list[int] = []
    timed_out = threading.Event()
    env = _child_env(env, follow)
    proc = subprocess.Popen(
        cmd,
        env=env,
        stdout=stdout,
        stderr=subprocess.PIPE if capture_stderr else None,
        text=True,
        start_new_session=True,  # its own group: what reaches it is what ecoadapt sends
    )

    def expire() -> None:
        timed_out.set()
        stop_group(proc, grace_s)

    previous = _forward_signals(proc, forwarded)
    timer = threading.Timer(timeout_s, expire) if timeout_s else None
    if timer:
        timer.daemon = True
        timer.start()
    reader = _read_lines(proc, tail, on_line) if proc.stderr is not None else None
    try:
        code = proc.wait()
        # Whatever of its group is left (a tokenizer worker of a child killed with SIGKILL)
        # goes too: it would hold the pipe open, and this read, forever.
        _kill_stragglers(proc)
        if reader is not None:
            reader.join(READER_JOIN_S)
    except BaseException:
        stop_group(proc, grace_s)  # never leave the group running behind an error here
        raise
    finally:
        if timer:
            timer.cancel()
        for s, handler in previous.items():
            signal.signal(s, handler)
    return ChildResult(code, forwarded[0] if forwarded else None, timed_out.is_set(), list(tail))


def _child_env(env: dict[str, str] | None, follow: bool) -> dict[str, str]:
    """The child's environment; with ``follow`` (an ecoadapt command, whose start reads it; not
    torchrun, whose ranks' parent is torchrun) this process's pid for :func:`follow_parent`."""
    out = dict(env if env is not None else os.environ)
    if follow:
        out[PARENT_ENV] = str(os.getpid())
    return out


def _read_lines(
    proc: subprocess.Popen[Any], tail: collections.deque[str], on_line: Callable[[str], None] | None
) -> threading.Thread:
    """Read the child's standard error in a thread, keeping its last lines, until the pipe closes."""

    def read() -> None:
        assert proc.stderr is not None
        with contextlib.suppress(ValueError, OSError):  # the pipe closed under the read
            for line in proc.stderr:
                tail.append(line)
                if on_line is not None:
                    with contextlib.suppress(OSError):  # our own terminal gone (SIGHUP): keep reading
                        on_line(line)

    thread = threading.Thread(target=read, name="ecoadapt-child-stderr", daemon=True)
    thread.start()
    return thread


def die_with_parent(signum: int = signal.SIGKILL) -> None:
    """Have the kernel send this process ``signum`` when its parent dies (Linux; elsewhere a
    no-op): a worker never outlives the run that started it, however the run ends."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signum, 0, 0, 0)


def follow_parent() -> None:
    """In a process run_child started: take SIGTERM (checkpoint, exit as interrupted) when the
    process that started it dies, and stop at once if it died already. The variable is removed,
    so that this process's own children (torchrun's ranks) do not take it for their parent."""
    expected = os.environ.pop(PARENT_ENV, None)
    if expected is None or not expected.isdigit():
        return
    die_with_parent(signal.SIGTERM)
    if os.getppid() != int(expected):  # the parent died before the line above: nobody waits for us
        os.kill(os.getpid(), signal.SIGTERM)


def detach_from_terminal() -> None:
    """After SIGHUP: point standard output and error that went to the (now closed) terminal at
    /dev/null, so that the run's last messages cannot end it with a broken pipe or an I/O
    error before its checkpoint is written. Pipes and files stay as they are."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        for fd in (1, 2):
            with contextlib.suppress(OSError):
                if os.isatty(fd):
                    os.dup2(devnull, fd)
    finally:
        os.close(devnull)


def _forward_signals(proc: subprocess.Popen[Any], forwarded: list[int]) -> dict[int, Any]:
    """Pass SIGTERM and SIGINT on to the child's group (noting each in ``forwarded``); returns the
    handlers to put back. Only the main thread may set handlers: elsewhere nothing is forwarded."""
    if threading.current_thread() is not threading.main_thread():
        return {}

    def forward(signum: int, frame: object) -> None:
        forwarded.append(signum)
        if signum == signal.SIGHUP:
            detach_from_terminal()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signum)

    return {s: signal.signal(s, forward) for s in FORWARDED}


def echo_to_stderr(line: str) -> None:
    """Pass a child's line of standard error through as it comes."""
    sys.stderr.write(line)
    sys.stderr.flush()

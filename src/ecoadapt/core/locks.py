"""Exclusive locks on files that say who holds them: a run folder, a token store being prepared.

A lock is an ``flock`` on a small file that its holder fills with its process, machine and start
time. The kernel releases the lock of a process that dies, however it dies, so a dead holder
never blocks anyone; a live one is named to whoever waits (or is refused).
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from ecoadapt.core.errors import UserError

POLL_S = 0.2  # how often a waiter tries again


def open_no_follow(path: Path) -> int:
    """Open (creating) a lock or guard file without following a symbolic link.

    Raises:
        UserError: the path is a symbolic link (it could point at any file of the user's).
    """
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise UserError(
                f"{path} is a symbolic link; ecoadapt never writes through one: remove the link and run again"
            ) from None
        raise


def holder(path: Path) -> str | None:
    """Who holds the lock at ``path`` now (None: nobody); the lock is not taken."""
    if not path.is_file() or path.is_symlink():
        return None
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return os.pread(fd, 4096, 0).decode("utf-8", "replace").strip() or "another process"
        return None
    finally:
        os.close(fd)


@contextmanager
def held(
    path: Path, what: str, wait_s: float = 0.0, say: Callable[[str], None] | None = None, fix: str = ""
) -> Iterator[None]:
    """Hold the exclusive lock at ``path`` for the body.

    Args:
        path: the lock file (created if missing; it stays, empty of meaning, when released).
        what: what the lock guards, for messages ("the run folder runs/x").
        wait_s: how long to wait for a live holder (0: refuse at once).
        say: where "waiting for ..." is said, once, when the lock is held by another.
        fix: what to do, appended to the error.

    Raises:
        UserError: still held by another live process after ``wait_s`` (naming it).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = open_no_follow(path)
    try:
        deadline, told = time.monotonic() + wait_s, False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                who = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip() or "another process"
                if time.monotonic() >= deadline:
                    waited = f" after waiting {wait_s:g} s" if wait_s else ""
                    raise UserError(f"{what} is in use by {who}{waited}; {fix or 'wait for it'}") from None
                if say is not None and not told:
                    say(f"waiting for {who}: it holds {what} (giving up after {wait_s:g} s)")
                    told = True
                time.sleep(POLL_S)
        os.ftruncate(fd, 0)
        since = time.strftime("%Y-%m-%d %H:%M:%S")
        os.pwrite(fd, f"process {os.getpid()} on {socket.gethostname()} since {since}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # closing releases the lock

"""The exceptions the CLI turns into one line: bad input (status 2) and a signal that stopped the work (128 + n)."""


class UserError(Exception):
    """Input the user can fix (a file, a line, a key, a value): the message says what and how.

    Raised anywhere; the CLI turns it into one line on stderr and exit status 2, with a traceback
    only under ``--debug``.
    """


class Interrupted(Exception):
    """A signal stopped the work: what was done is kept, and the same command resumes it.

    The command line prints the message and exits with 128 + the signal's number.
    """

    def __init__(self, signal_name: str, message: str) -> None:
        super().__init__(message)
        self.signal_name = signal_name
        """SIGTERM or SIGINT."""

    @property
    def exit_status(self) -> int:
        """128 + the signal's number, as a shell reports a process a signal ended."""
        import signal

        return 128 + int(signal.Signals[self.signal_name])


class AlreadySaid(Exception):
    """A failure whose one line the user has already read (a sweep's point printed it as it ran):
    the command line exits with ``exit_status`` and prints nothing more."""

    def __init__(self, exit_status: int) -> None:
        super().__init__(f"exit status {exit_status}")
        self.exit_status = exit_status


def first_line(error: BaseException) -> str:
    """The first line of an error's message (200 characters at most), or its type's name: what
    a one-line message quotes from a library's error."""
    text = str(error).strip()
    return text.splitlines()[0][:200] if text else type(error).__name__


DISK_FULL_ERRNOS = frozenset({28, 27, 122})  # ENOSPC, EFBIG (a file-size limit), EDQUOT (a quota)
DISK_FULL_TEXT = ("No space left on device", "File too large", "Disk quota exceeded", "os error 28", "os error 27")


DISK_FULL = "the disk is full (or a file-size limit or quota was reached)"


def disk_full_message(where: str) -> str:
    """The one line a full disk (or a file-size limit or quota) is reported by."""
    return (
        f"{DISK_FULL} writing {where}: free some space and rerun the same command; every file was "
        "written atomically, so what was done before is whole and resumes"
    )


def disk_full(error: BaseException) -> str | None:
    """What ran out when ``error`` (or an error it was raised from) is a full disk, a file-size
    limit or a quota: the file it names where it names one; None for any other error. Libraries
    wrap the OSError (torch.save in a RuntimeError, safetensors in its own error), so their
    messages are read too."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in DISK_FULL_ERRNOS:
            return str(current.filename) if current.filename else "a file"
        if any(text in str(current) for text in DISK_FULL_TEXT):
            return "a file"
        current = current.__cause__ or current.__context__
    return None

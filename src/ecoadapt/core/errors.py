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


def first_line(error: BaseException) -> str:
    """The first line of an error's message (200 characters at most), or its type's name: what
    a one-line message quotes from a library's error."""
    text = str(error).strip()
    return text.splitlines()[0][:200] if text else type(error).__name__

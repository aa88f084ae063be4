"""The one exception type for bad input: the CLI prints its message and exits with status 2."""


class UserError(Exception):
    """Input the user can fix (a file, a line, a key, a value): the message says what and how.

    Raised anywhere; the CLI turns it into one line on stderr and exit status 2, with a traceback
    only under ``--debug``.
    """

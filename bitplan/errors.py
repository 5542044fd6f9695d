"""The one exception type bitplan raises for problems the user can fix."""


class BitplanError(Exception):
    """A user-facing error: bad input, missing file, impossible budget.

    The command line prints its message on one line and exits with status 2, so the message
    should say what went wrong and what to do about it.
    """

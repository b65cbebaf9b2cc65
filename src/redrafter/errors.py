"""The one exception type front ends turn into a clear message and a non-zero exit."""


class RedrafterError(Exception):
    """A user-facing error: bad input, a missing file, an incompatible checkpoint.

    The message names the offending thing and, where there is one, the fix. Front ends print it
    without a traceback (CLI: ``error: <message>``, exit code 2).
    """

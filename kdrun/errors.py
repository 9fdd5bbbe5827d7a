"""The one exception type users see: its message is printed as a single line, without a traceback."""


class KdrunError(Exception):
    """A problem with the user's input or environment that they can fix.

    The message must name what was wrong and how to fix it, on one line.
    """

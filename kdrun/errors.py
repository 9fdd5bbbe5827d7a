"""The one exception type users see: its message is printed as a single line, without a traceback."""


class KdrunError(Exception):
    """A problem with the user's input or environment that they can fix.

    The message must name what was wrong and how to fix it, on one line.
    """


class DivergedError(KdrunError):
    """Training met a non-finite loss or weights. The run stops before any checkpoint holds that state.

    `details` (stage, epoch, step, the non-finite terms, the last good checkpoint) goes into metrics.json.
    """

    def __init__(self, message: str, details: dict):
        super().__init__(message)
        self.details = details

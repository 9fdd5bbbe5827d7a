from __future__ import annotations

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


# A DataLoader worker re-raises an error wrapped in its traceback; the last line holds the original message.
_WORKER_PREFIX = "kdrun.errors.KdrunError: "


def one_line(error: object, limit: int | None = None) -> str:
    """An error's message (or any text) on one line, for the terminal or inside another message.

    `limit`: cut longer text to that many characters (for a library's message quoted in ours).
    """
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    if not lines:
        return type(error).__name__ if isinstance(error, BaseException) else ""
    if len(lines) > 1 and lines[-1].startswith(_WORKER_PREFIX):
        text = lines[-1][len(_WORKER_PREFIX):]
    else:
        text = " ".join(" ".join(lines).split())
    return text if limit is None or len(text) <= limit else text[: limit - 3] + "..."

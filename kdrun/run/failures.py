"""A run that did not complete: its one-line message, its metrics.json record and its exit code.

`failed`: bad input or environment (exit 2). `diverged`: training met a non-finite loss (exit 3); the
run's metrics.json says where, and the last good checkpoint is kept. Light imports only: the CLI
answers bad input before torch loads.
"""
from __future__ import annotations

import errno
import logging
from pathlib import Path
from typing import Optional

from kdrun.errors import DivergedError, KdrunError, one_line
from kdrun.run_files import METRICS_FILE, has_work, write_json_atomic

log = logging.getLogger("kdrun")

EXIT_FAILED, EXIT_DIVERGED = 2, 3
# OSErrors that mean "this path cannot be used" rather than a bug in kdrun.
UNUSABLE_PATH = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.EEXIST, errno.EISDIR,
                 errno.ENAMETOOLONG}
NO_SPACE = {errno.ENOSPC, errno.EDQUOT}


def as_user_error(error: BaseException) -> Optional[KdrunError]:
    """The KdrunError to report for `error`, or None when it is a bug that deserves its traceback."""
    if isinstance(error, KdrunError):
        return error
    if isinstance(error, OSError) and error.errno in UNUSABLE_PATH | NO_SPACE:
        where = error.filename if error.filename is not None else "a file kdrun writes"
        fix = ("free some disk space, or write elsewhere with hydra.run.dir=DIR / cache_dir=DIR"
               if error.errno in NO_SPACE else
               "point hydra.run.dir=DIR (hydra.sweep.dir=DIR for -m) or cache_dir=DIR at a folder you can write")
        return KdrunError(f"{error.strerror}: {where}; {fix}")
    return None


def status_of(error: KdrunError) -> str:
    return "diverged" if isinstance(error, DivergedError) else "failed"


def exit_code(error: KdrunError) -> int:
    return EXIT_DIVERGED if isinstance(error, DivergedError) else EXIT_FAILED


def record_failure(error: KdrunError, run_dir: Path, always: bool = False) -> None:
    """metrics.json with the status, when the run did some work (or diverged: where is worth keeping),
    or `always` (a sweep job: the sweep's report lists it)."""
    diverged = isinstance(error, DivergedError)
    if not (always or diverged or has_work(run_dir)):
        return  # nothing to keep: the CLI removes the directory
    record = {"status": status_of(error), "error": one_line(error)}
    if diverged:
        record["diverged"] = error.details
    try:
        write_json_atomic(record, run_dir / METRICS_FILE)
    except OSError as write_error:  # the disk that failed the run may fail this too; the message still goes out
        log.warning("could not write %s: %s", run_dir / METRICS_FILE, write_error)

"""Names and writers of the files a run leaves in its directory, and the lock a live run holds."""
from __future__ import annotations

import json
import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from kdrun.errors import KdrunError

try:
    import fcntl
except ImportError:  # Windows: no flock; a pid check stands in for it
    fcntl = None

METRICS_FILE = "metrics.json"
# The logits behind the soft-target figures (kdrun/tensorboard/soft_target_record.py), for report.html.
SOFT_TARGETS_FILE = "soft_targets.json"
# Held (flock) by the process that runs the run, removed when it ends: kdrun-report tells a live run
# from one killed by SIGTERM/SIGKILL, whose lock the kernel released with the process.
RUN_LOCK = ".kdrun.lock"
HYDRA_FILES = (".hydra", "kdrun.log", RUN_LOCK)  # what exists before kdrun does any work
# Overrides that change how a run goes, never its result: resuming finds the run without them, and
# kdrun-report never shows them as swept.
IGNORED_KEYS = ("resume", "progress")

# A stage's resumable checkpoint and the one written an epoch before it (engine/last_checkpoint.py).
LAST_CHECKPOINT, PREVIOUS_CHECKPOINT = "last.pt", "last.prev.pt"


def deployed_artifacts(metrics: dict) -> dict[str, dict]:
    """metrics.json's deployed artifacts (export=, quantize=): the `<role>_<kind>` entries, e.g. `student_int8`,
    each with `top1_drop` from the PyTorch model it came from."""
    return {key: value for key, value in metrics.items() if isinstance(value, dict) and "top1_drop" in value}


def write_json_atomic(data: dict, path: Path) -> None:
    """Write to a temporary file and rename it, so readers never see half a file."""
    write_text_atomic(json.dumps(data, indent=2), path)


def write_text_atomic(text: str, path: Path) -> None:
    with replacing(path) as tmp:
        tmp.write_text(text)


@contextmanager
def replacing(path: Path) -> Iterator[Path]:
    """A temporary path beside `path` to write; renamed onto `path` when the block ends without an error."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # a full disk must not leave the temporary file behind


def has_work(run_dir: Path) -> bool:
    """Whether the run wrote anything besides Hydra's own files (config copies and the log)."""
    return run_dir.is_dir() and any(p.name not in HYDRA_FILES for p in run_dir.iterdir())


def has_checkpoint(checkpoint_dir: Path) -> bool:
    """Whether a stage can resume from `checkpoint_dir` (its last.pt, or the one before it)."""
    return any((checkpoint_dir / name).is_file() for name in (LAST_CHECKPOINT, PREVIOUS_CHECKPOINT))


class RunInUseError(KdrunError):
    """Another live process runs the directory: it is theirs, nothing of it may be touched."""


@contextmanager
def holding_run(run_dir: Path) -> Iterator[None]:
    """Hold `run_dir`'s lock while the block runs: a second process cannot run into the same directory,
    and kdrun-report shows the run as `running` exactly as long as this process lives."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / RUN_LOCK
    handle = path.open("a+")
    if fcntl is not None:
        _lock_or_explain(handle, path)  # before the try: a directory in use keeps its holder's lock file
    try:
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()} {socket.gethostname()}\n")  # for people; the lock itself is the flock
        handle.flush()
        yield
    finally:
        try:
            path.unlink()  # a completed or failed run needs no lock file; its metrics.json says the rest
        except OSError:
            pass
        handle.close()


def _lock_or_explain(handle, path: Path) -> None:
    for _ in range(20):  # kdrun-report takes the lock for an instant when it checks: wait that out
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            time.sleep(0.05)
        except OSError:  # a file system without locks: the pid written below is all there is
            return
    handle.seek(0)
    holder = handle.read().strip() or "another process"
    handle.close()
    raise RunInUseError(f"{path.parent} is in use by a running kdrun (pid, host: {holder}): wait for it to end, "
                     "or write elsewhere with hydra.run.dir=DIR")


def run_is_live(run_dir: Path) -> bool:
    """Whether a process still runs `run_dir` (it holds the lock), for a directory without metrics.json."""
    path = run_dir / RUN_LOCK
    try:
        handle = path.open("r")
    except OSError:
        return False  # never locked (an older kdrun), or the run ended and removed it
    with handle:
        if fcntl is None:
            return _pid_alive(handle.read())
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        except OSError:  # a file system without locks: trust the pid
            return _pid_alive(handle.read())
        return False


def _pid_alive(holder: str) -> bool:
    pid, _, host = holder.strip().partition(" ")
    if not pid.isdigit() or host != socket.gethostname():
        return bool(pid)  # another machine's process: it may well live
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except OSError:  # it exists, owned by someone else
        return True
    return True

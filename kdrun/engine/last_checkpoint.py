"""A stage's resumable state: <dir>/last.pt, and last.prev.pt, the one written an epoch before.

Each epoch the new last.pt goes to a temporary file; then the old last.pt is renamed to last.prev.pt
and the new one renamed into place (both renames atomic), so a kill at any moment leaves at least one
complete checkpoint. On resume, a last.pt that cannot be read (a torn copy, a full disk, a bad
sector) is moved aside to last.pt.corrupt, a one-line warning says so, and the stage continues from
last.prev.pt, one epoch earlier. Moving it aside keeps the next rotation from turning the good
last.prev.pt into a copy of the broken file.
"""
from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any, Optional


from kdrun.errors import one_line
from kdrun.engine.checkpoint import FORMAT, load_file, save_atomic
from kdrun.errors import KdrunError
from kdrun.run_files import LAST_CHECKPOINT as LAST, PREVIOUS_CHECKPOINT as PREVIOUS

log = logging.getLogger("kdrun")

STATE_KEYS = ("model", "loss", "optimizer", "scheduler", "epoch", "history", "best_top1", "best_epoch", "rng")
MODEL_KEYS = ("model_name", "num_classes", "in_chans")
MAX_DETAIL = 160  # characters of an underlying error quoted in a one-line message


def save_last(state: dict, directory: Path) -> None:
    save_atomic(state, directory / LAST, keep_previous=directory / PREVIOUS)


def load_last(directory: Path, stage: str, meta: dict) -> Optional[tuple[dict, Path]]:
    """The newest readable checkpoint of the stage and its path; None when there is none at all."""
    _remove_dead_temporaries(directory)
    broken = []
    for name in (LAST, PREVIOUS):
        path = directory / name
        if not path.is_file():
            continue
        problem, state = _read(path)
        if problem is None:
            _check_same_model(state, path, stage, meta)
            return state, path
        corrupt = path.with_name(path.name + ".corrupt")
        os.replace(path, corrupt)
        log.warning("%s: %s is unreadable (%s); moved it to %s and trying the previous checkpoint",
                    stage, path, problem, corrupt.name)
        broken.append(name)
    if broken:
        raise KdrunError(f"{stage}: cannot resume from {directory}: {' and '.join(broken)} "
                         f"{'is' if len(broken) == 1 else 'are'} unreadable (moved to *.corrupt); run again to "
                         "start this stage over")
    return None


def restore(state: dict, path: Path, stage: str, *parts_and_states: tuple[Any, str]) -> None:
    """Load each (module/optimizer/scheduler, key) pair from `state`; a misfit is a one-line error."""
    try:
        for part, key in parts_and_states:
            part.load_state_dict(state[key])
    except (RuntimeError, ValueError, KeyError) as error:
        raise KdrunError(f"{stage}: {path} does not fit this run ({_short(error)}); it was written by another "
                         "configuration: pass another hydra.run.dir, or delete it to start over") from error


def _read(path: Path) -> tuple[Optional[str], Any]:
    try:
        state = load_file(path)
    except MemoryError:
        raise
    except Exception as error:  # a torn zip, garbage bytes: unpicklers fail in many ways
        return f"{type(error).__name__}: {_short(error)}", None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        return "not a kdrun checkpoint", None
    missing = [key for key in STATE_KEYS if key not in state]
    if missing:
        return f"no {', '.join(missing)}", None
    return None, state


def _check_same_model(state: dict, path: Path, stage: str, meta: dict) -> None:
    for key in MODEL_KEYS:
        if key in meta and key in state and state[key] != meta[key]:
            raise KdrunError(f"{stage}: {path} was written for {key}={state[key]!r} but this run has "
                             f"{key}={meta[key]!r}; pass another hydra.run.dir, or delete it to start over")


def _remove_dead_temporaries(directory: Path) -> None:
    """Temporary files of a process killed while writing (.last.pt.tmp<pid>); never a live writer's."""
    for tmp in directory.glob(".*.tmp*"):
        match = re.search(r"\.tmp(\d+)$", tmp.name)
        if match and int(match.group(1)) != os.getpid() and not _alive(int(match.group(1))):
            tmp.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _short(error: BaseException) -> str:
    text = one_line(error)
    return text if len(text) <= MAX_DETAIL else text[:MAX_DETAIL] + "..."

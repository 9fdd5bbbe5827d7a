"""`resume=true`: find the interrupted run with the same overrides and continue it in its own directory.

Hydra makes a new run directory before kdrun sees the config; a resumed run moves its log back into the
interrupted run's directory and removes that new one, so the run's kdrun.log tells the whole story and
no husk (only .hydra/ and a log) is left for kdrun-report to show as a phantom run.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Optional

from omegaconf import OmegaConf

from kdrun.run_files import IGNORED_KEYS, LAST_CHECKPOINT, PREVIOUS_CHECKPOINT, has_work, run_is_live
LOG_FILE = "kdrun.log"


def comparable_overrides(overrides: list[str]) -> list[str]:
    return sorted(o for o in overrides if o.split("=", 1)[0].lstrip("+~") not in IGNORED_KEYS)


def _finished(run_dir: Path) -> bool:
    try:
        return json.loads((run_dir / "metrics.json").read_text()).get("status") == "completed"
    except (OSError, ValueError):
        return False


def find_resumable_run(run_dir: Path, overrides: list[str]) -> Optional[Path]:
    """The newest unfinished run beside `run_dir` (outputs/runs/<date>/<time>) with the same overrides,
    that no live process runs."""
    runs_root = run_dir.parent.parent
    wanted = comparable_overrides(overrides)
    # last.prev.pt alone counts too: it is what is left when last.pt was found unreadable.
    checkpoints = [path for name in (LAST_CHECKPOINT, PREVIOUS_CHECKPOINT)
                   for path in runs_root.glob(f"*/*/checkpoints/{name}")]
    for last in sorted(checkpoints, key=lambda p: p.stat().st_mtime, reverse=True):
        candidate = last.parent.parent
        if candidate == run_dir or _finished(candidate) or run_is_live(candidate):
            continue
        saved = candidate / ".hydra" / "overrides.yaml"
        if saved.is_file() and comparable_overrides(list(OmegaConf.load(saved))) == wanted:
            return candidate
    return None


def continue_in_place(previous: Path, husk: Path, since: float) -> None:
    """Log into `previous` from now on; remove `husk`, the directory Hydra made for this invocation, when it
    holds only Hydra's files written since `since` (a directory the user named, with older files, stays)."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, logging.FileHandler) and Path(handler.baseFilename).parent == Path(os.path.abspath(husk)):
            root.addHandler(_appending_to(previous / LOG_FILE, handler))
            root.removeHandler(handler)
            handler.close()
    if not husk.is_dir() or has_work(husk) or not _written_since(husk, since):
        return
    written = husk / LOG_FILE
    if written.is_file() and written.stat().st_size:  # lines Hydra's callbacks logged before the move
        with (previous / LOG_FILE).open("a") as log_file:
            log_file.write(written.read_text(errors="replace"))
    shutil.rmtree(husk, ignore_errors=True)
    try:
        husk.parent.rmdir()  # outputs/runs/<date>/ made for the husk alone
    except OSError:
        pass


def _appending_to(path: Path, like: logging.FileHandler) -> logging.FileHandler:
    """A FileHandler that appends to `path`, with the level, format and filters of `like`."""
    handler = logging.FileHandler(path, mode="a", encoding=like.encoding)
    handler.setLevel(like.level)
    handler.setFormatter(like.formatter)
    for log_filter in like.filters:
        handler.addFilter(log_filter)
    return handler


def _written_since(directory: Path, since: float) -> bool:
    return all(p.stat().st_mtime >= since for p in directory.rglob("*") if p.is_file())

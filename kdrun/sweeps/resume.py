"""`kdrun -m ... resume=true`: re-run the newest sweep with the same overrides in its own directory.

The default sweep directory is named after the time it started, so a plain re-run would start over in a
new one. Given the old directory, every job whose metrics.json says `completed` for the same overrides
is skipped (kdrun/sweep_jobs.py) and the others run again, continuing from their checkpoints/last.pt.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

from omegaconf import OmegaConf

from kdrun.paths import conf_dir
from kdrun.run.resume import comparable_overrides
from kdrun.sweeps.callback import SWEEP_FILE

MULTIRUN_FLAGS = ("-m", "--multirun")
TRUE_VALUES = ("true", "yes", "on", "1")


def _task_overrides(args: list[str]) -> list[str]:
    """The overrides Hydra records as the task's (hydra.overrides.task): all but flags and hydra's own."""
    task = []
    for arg in args:
        if arg.startswith("-") or "=" not in arg:
            continue
        if arg.lstrip("+~").startswith(("hydra.", "hydra/")):
            continue
        task.append(arg)
    return task


def _wants_resume(args: list[str]) -> bool:
    return any(arg.split("=", 1)[1].strip().lower() in TRUE_VALUES
               for arg in _task_overrides(args) if arg.split("=", 1)[0].lstrip("+") == "resume")


def default_sweep_root() -> Path:
    """The fixed part of config.yaml's hydra.sweep.dir: outputs/multirun for outputs/multirun/${now:...}/..."""
    pattern = str(OmegaConf.to_container(OmegaConf.load(conf_dir() / "config.yaml"))["hydra"]["sweep"]["dir"])
    fixed = pattern.split("${", 1)[0]
    return Path(fixed if fixed.endswith("/") else Path(fixed).parent)


def find_sweep_to_resume(root: Path, overrides: list[str]) -> Optional[Path]:
    """The newest sweep under `root` whose recorded overrides equal `overrides` (resume/progress aside)."""
    wanted = comparable_overrides(overrides)
    saved = sorted(root.glob(f"**/{SWEEP_FILE}"), key=lambda p: p.stat().st_mtime, reverse=True)
    for record in saved:
        try:
            recorded = json.loads(record.read_text())["overrides"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if comparable_overrides([str(o) for o in recorded]) == wanted:
            return record.parent
    return None


def resume_sweep_args(args: list[str]) -> list[str]:
    """Add hydra.sweep.dir=<the previous sweep> to a multirun with resume=true, when one matches."""
    if not any(arg in MULTIRUN_FLAGS for arg in args) or not _wants_resume(args):
        return args
    if any(arg.lstrip("+").startswith("hydra.sweep.dir=") for arg in args):
        return args  # the user named the directory: its completed jobs are skipped as they are
    root = default_sweep_root()
    previous = find_sweep_to_resume(root, _task_overrides(args))
    if previous is None:
        print(f"kdrun: resume=true: no earlier sweep with these overrides under {root}; starting a new one",
              file=sys.stderr)
        return args
    print(f"kdrun: resume=true: re-running the sweep in {previous}; completed jobs are skipped", file=sys.stderr)
    return [*args, f"hydra.sweep.dir={previous}"]

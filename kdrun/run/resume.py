"""Finding the interrupted run that `resume=true` continues."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from omegaconf import OmegaConf

from kdrun.run_files import LAST_CHECKPOINT, PREVIOUS_CHECKPOINT

IGNORED_KEYS = ("resume", "progress")


def comparable_overrides(overrides: list[str]) -> list[str]:
    return sorted(o for o in overrides if o.split("=", 1)[0].lstrip("+~") not in IGNORED_KEYS)


def _finished(run_dir: Path) -> bool:
    try:
        return json.loads((run_dir / "metrics.json").read_text()).get("status") == "completed"
    except (OSError, ValueError):
        return False


def find_resumable_run(run_dir: Path, overrides: list[str]) -> Optional[Path]:
    """The newest unfinished run beside `run_dir` (outputs/runs/<date>/<time>) with the same overrides."""
    runs_root = run_dir.parent.parent
    wanted = comparable_overrides(overrides)
    # last.prev.pt alone counts too: it is what is left when last.pt was found unreadable.
    checkpoints = [path for name in (LAST_CHECKPOINT, PREVIOUS_CHECKPOINT)
                   for path in runs_root.glob(f"*/*/checkpoints/{name}")]
    for last in sorted(checkpoints, key=lambda p: p.stat().st_mtime, reverse=True):
        candidate = last.parent.parent
        if candidate == run_dir or _finished(candidate):
            continue
        saved = candidate / ".hydra" / "overrides.yaml"
        if saved.is_file() and comparable_overrides(list(OmegaConf.load(saved))) == wanted:
            return candidate
    return None

"""Names and writers of the files a run leaves in its directory."""
from __future__ import annotations

import json
import os
from pathlib import Path

METRICS_FILE = "metrics.json"
HYDRA_FILES = (".hydra", "kdrun.log")  # what Hydra writes before kdrun does anything
# A stage's resumable checkpoint and the one written an epoch before it (engine/last_checkpoint.py).
LAST_CHECKPOINT, PREVIOUS_CHECKPOINT = "last.pt", "last.prev.pt"


def write_json_atomic(data: dict, path: Path) -> None:
    """Write to a temporary file and rename it, so readers never see half a file."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def has_work(run_dir: Path) -> bool:
    """Whether the run wrote anything besides Hydra's own files (config copies and the log)."""
    return run_dir.is_dir() and any(p.name not in HYDRA_FILES for p in run_dir.iterdir())


def has_checkpoint(checkpoint_dir: Path) -> bool:
    """Whether a stage can resume from `checkpoint_dir` (its last.pt, or the one before it)."""
    return any((checkpoint_dir / name).is_file() for name in (LAST_CHECKPOINT, PREVIOUS_CHECKPOINT))

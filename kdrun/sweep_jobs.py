"""One job of a sweep: its objective, skipping it when a re-run finds it completed, recording its failure.

A job whose directory already holds metrics.json with `status: completed` for the same overrides returns
the stored objective without training, so re-running a sweep into its old directory runs only the jobs
that failed or never finished. A job that fails writes `status: failed` with the reason and returns no
objective: the launcher goes on with the other jobs and an Optuna sweeper marks the trial failed.
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Optional

from kdrun.errors import KdrunError
from kdrun.resume import _comparable
from kdrun.run_files import METRICS_FILE, write_json_atomic

log = logging.getLogger("kdrun")


def objective(metrics: dict) -> Optional[float]:
    """What a sweeper maximises: the student's best validation top-1; None when there is no number."""
    value = (metrics.get("student") or {}).get("best_top1")
    if value is None or not math.isfinite(float(value)):
        return None
    return float(value)


def completed_metrics(run_dir: Path, overrides: list[str]) -> Optional[dict]:
    """metrics.json of a job that completed earlier with the same overrides (resume/progress aside)."""
    try:
        metrics = json.loads((run_dir / METRICS_FILE).read_text())
    except (OSError, ValueError):
        return None
    if metrics.get("status") != "completed" or "overrides" not in metrics:
        return None
    if _comparable([str(o) for o in metrics["overrides"]]) != _comparable(overrides):
        return None
    return metrics


def record_failure(run_dir: Path, error: BaseException) -> str:
    """Write metrics.json `failed` with a one-line reason, and return that reason."""
    text = str(error).strip()
    reason = text.splitlines()[0] if text else ""
    if not isinstance(error, KdrunError):  # an unexpected error: its type says most
        reason = f"{type(error).__name__}: {reason}" if reason else type(error).__name__
    if run_dir.is_dir():
        write_json_atomic({"status": "failed", "error": reason}, run_dir / METRICS_FILE)
    return reason

"""One job of a sweep: its objective, and skipping it when a re-run finds it completed.

A job whose directory already holds metrics.json with `status: completed` for the same overrides returns
the stored objective without training, so re-running a sweep into its old directory runs only the jobs
that failed or never finished. A job that fails (kdrun.run.failures.record_failure) returns no objective:
the launcher goes on with the other jobs and an Optuna sweeper marks the trial failed.
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Optional

from kdrun.run.resume import comparable_overrides
from kdrun.run_files import METRICS_FILE

log = logging.getLogger("kdrun")


def objective(metrics: dict) -> Optional[float]:
    """What a sweeper maximises: the student's best validation top-1, or the top-1 of the final model of
    a paradigm without a student (baseline, teacher); None when there is no number."""
    student = metrics.get("student") or {}
    value = student.get("best_top1", student.get("top1"))
    for role in ("baseline", "teacher"):
        if value is None and metrics.get(role):
            value = metrics[role].get("top1")
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
    if comparable_overrides([str(o) for o in metrics["overrides"]]) != comparable_overrides(overrides):
        return None
    return metrics

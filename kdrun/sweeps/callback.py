"""The failed jobs of a multirun, found where the sweep started (a Hydra callback, see config.yaml).

With the joblib or submitit launcher, jobs run in other processes: what they record in memory never
reaches the `kdrun` process. Their metrics.json files do: the callback notes the sweep directory and
the time the multirun started, and `failed_jobs()` lists this sweep's jobs whose status is `failed` or
`diverged`.
It also records the sweep's overrides in the sweep directory, where `resume=true` finds them.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Optional

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from kdrun.run_files import METRICS_FILE, write_json_atomic

SWEEP_FILE = ".kdrun_sweep.json"  # in the sweep directory: the sweep's own command-line overrides

_started: dict[str, Any] = {"sweep_dir": None, "time": 0.0}


def failed_since(sweep_dir: Path, since: float) -> list[str]:
    """`<job dir name> <status>: <reason>` for each job under `sweep_dir` that failed or diverged after `since`."""
    failed = []
    for metrics_file in sorted(sweep_dir.glob(f"*/{METRICS_FILE}")):
        try:
            if metrics_file.stat().st_mtime < since:
                continue  # left by an earlier sweep into the same directory
            metrics = json.loads(metrics_file.read_text())
        except (OSError, ValueError):
            continue
        if metrics.get("status") in ("failed", "diverged"):
            failed.append(f"{metrics_file.parent.name} {metrics['status']}: {metrics.get('error', 'unknown error')}")
    return failed


def failed_jobs() -> list[str]:
    """The failed jobs of the multirun this process started; [] after a single run."""
    sweep_dir: Optional[str] = _started["sweep_dir"]
    return failed_since(Path(sweep_dir), _started["time"]) if sweep_dir else []


class CollectFailedJobs(Callback):
    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        # Resolved once, here: ${now:...} then reads the same time for the launcher and for us.
        _started["sweep_dir"] = str(config.hydra.sweep.dir)
        _started["time"] = time.time() - 1.0  # file times are coarser than time.time()
        # What resume=true looks for (Hydra's multirun.yaml is written by the basic sweeper only).
        try:
            task = OmegaConf.to_container(config.hydra.overrides.task, resolve=False)  # `${...}` as typed
            record_sweep(Path(_started["sweep_dir"]), [str(o) for o in task])
        except OSError:
            pass  # an unusable sweep dir: the launcher fails on it next, with kdrun's one-line error


def record_sweep(sweep_dir: Path, overrides: list[str]) -> None:
    sweep_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic({"overrides": overrides}, sweep_dir / SWEEP_FILE)

"""`kdrun`: compose the config with Hydra, run the experiment, return the objective for sweepers.

Every user error ends as one line on stderr and a non-zero exit, never a traceback
(set KDRUN_TRACEBACK=1 to see one anyway).
"""
from __future__ import annotations

import logging
import os
import shutil
import sys
from pathlib import Path
from typing import Optional

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

# Only light imports here: bad input is answered before torch and timm load (seconds on a laptop).
from kdrun.argv import ArgvError, preflight
from kdrun.config import register_configs, validate
from kdrun.errors import KdrunError
from kdrun.paths import conf_dir
from kdrun.resume import find_resumable_run
from kdrun.run_files import METRICS_FILE, has_work, write_json_atomic

log = logging.getLogger("kdrun")
register_configs()

# Jobs of a multirun that failed; the sweep goes on and main() reports them at the end.
_failed_jobs: list[str] = []
# The directory Hydra made for the current single run, to remove it if the run fails before any work.
_current_run_dir: list[Path] = []
# The error that ended a single run. Raising it through Hydra would add Hydra's own lines to stderr.
_run_error: list[KdrunError] = []


@hydra.main(version_base="1.3", config_path=str(conf_dir()), config_name="config")
def hydra_entry(cfg: DictConfig) -> Optional[float]:
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    if not multirun:
        _current_run_dir.append(run_dir)
    if cfg.resume and not multirun and not (run_dir / "checkpoints" / "last.pt").is_file():
        previous = find_resumable_run(run_dir, list(hydra_cfg.overrides.task))
        if previous is None:
            log.warning("resume=true: no interrupted run with these overrides under %s; starting afresh",
                        run_dir.parent.parent)
        else:
            log.info("resume=true: continuing the interrupted run in %s", previous)
            run_dir = previous
    try:
        validate(cfg)
        from kdrun.paradigms import objective
        from kdrun.runner import run_experiment  # heavy: torch, timm, torchvision

        return objective(run_experiment(cfg, run_dir))
    except KdrunError as error:
        if has_work(run_dir):
            write_json_atomic({"status": "failed", "error": str(error)}, run_dir / METRICS_FILE)
        if not multirun:
            _log_to_file_only(f"error: {error}")  # main() prints it once on stderr
            _run_error.append(error)
            return None
        # In a sweep one bad job must not stop the others.
        log.error("job failed: %s", error)
        _failed_jobs.append(f"{run_dir.name}: {error}")
        return None


def _log_to_file_only(message: str) -> None:
    record = log.makeRecord(log.name, logging.ERROR, __file__, 0, message, None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def _discard_empty_run_dir() -> None:
    """A run that failed before doing any work leaves no half-written directory behind."""
    for run_dir in _current_run_dir:
        if run_dir.is_dir() and not has_work(run_dir):
            logging.shutdown()
            shutil.rmtree(run_dir, ignore_errors=True)


def _one_line(error: BaseException) -> str:
    """Hydra and OmegaConf messages span lines; keep what names the problem."""
    parts = [str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__]
    cause = error.__cause__
    if cause is not None and str(cause).strip():
        parts.append(str(cause).strip().splitlines()[0])
    return ": ".join(parts)


def main() -> None:
    # Hydra prints compose errors over several lines; let them reach us and print one line instead.
    os.environ.setdefault("HYDRA_FULL_ERROR", "1")
    show_traceback = os.environ.get("KDRUN_TRACEBACK") == "1"
    if any(arg in ("-h", "--help") for arg in sys.argv[1:]):
        from kdrun.help import help_text

        print(help_text())
        return
    try:
        sys.argv[1:] = preflight(sys.argv[1:])
        hydra_entry()
        if _run_error:
            raise _run_error[0]
    except (KdrunError, ArgvError) as error:
        _discard_empty_run_dir()
        if show_traceback:
            raise
        print(f"kdrun: error: {error}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("kdrun: interrupted; continue later with resume=true (or rerun into the same directory)",
              file=sys.stderr)
        sys.exit(130)
    except Exception as error:  # Hydra's composition and override errors
        if show_traceback or not _is_config_error(error):
            raise
        print(f"kdrun: error: {_one_line(error)}", file=sys.stderr)
        sys.exit(2)
    if _failed_jobs:
        print(f"kdrun: error: {len(_failed_jobs)} sweep job(s) failed: " + "; ".join(_failed_jobs), file=sys.stderr)
        sys.exit(1)


def _is_config_error(error: Exception) -> bool:
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    return isinstance(error, (HydraException, OmegaConfBaseException))


if __name__ == "__main__":
    main()

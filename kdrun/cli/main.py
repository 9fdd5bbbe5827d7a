"""`kdrun`: compose the config with Hydra, run the experiment, return the objective for sweepers.

Every user error ends as one line on stderr and a non-zero exit, never a traceback
(set KDRUN_TRACEBACK=1 to see one anyway).
"""
from __future__ import annotations

import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Optional

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

# Only light imports here: bad input is answered before torch and timm load (seconds on a laptop).
from kdrun.cli.argv import preflight
from kdrun.cli.hints import hydra_error_line
from kdrun.config.schema import register_configs, validate
from kdrun.errors import KdrunError, one_line
from kdrun.run.failures import as_user_error, exit_code, record_failure, status_of
from kdrun.paths import conf_dir
from kdrun.engine.ranks import worker_argv
from kdrun.run.resume import continue_in_place, find_resumable_run
from kdrun.run_files import RunInUseError, has_checkpoint, has_work, holding_run, run_is_live
from kdrun.sweeps.callback import failed_jobs
from kdrun.sweeps.jobs import completed_metrics, objective
from kdrun.sweeps.names import register_resolver, remember_swept_keys

log = logging.getLogger("kdrun")
_STARTED = time.time() - 1.0  # file times are coarser: a directory Hydra makes for this process is newer
register_configs()
register_resolver()

# Jobs of a multirun that fail write metrics.json `failed` (or `diverged`); the sweep goes on and main() reports them
# at the end (failed_jobs(), from the files: jobs may run in other processes).
# The directory Hydra made for the current single run, to remove it if the run fails before any work.
_current_run_dir: list[Path] = []
# The error that ended a single run. Raising it through Hydra would add Hydra's own lines to stderr.
_run_error: list[KdrunError] = []


@hydra.main(version_base="1.3", config_path=str(conf_dir()), config_name="config")
def hydra_entry(cfg: DictConfig) -> Optional[float]:
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    # As typed: `student.lr=${lr}` stays a string here instead of being resolved (or failing) as an interpolation.
    overrides = [str(o) for o in OmegaConf.to_container(hydra_cfg.overrides.task, resolve=False)]
    if not multirun:
        _current_run_dir.append(run_dir)
        run_dir = _resumed_run_dir(cfg, run_dir, overrides)
    try:
        with holding_run(run_dir):  # kdrun-report: `running` while this process lives, `interrupted` after
            return _run(cfg, run_dir, overrides, multirun)
    except RunInUseError as error:  # another process's run: write nothing into it
        if not multirun:
            _run_error.append(error)
        else:
            log.warning("job skipped: %s", one_line(error))  # no "job failed": the live job's log is this one
        return None


def _resumed_run_dir(cfg: DictConfig, run_dir: Path, overrides: list[str]) -> Path:
    """Where a single run goes: `run_dir`, or with resume=true the interrupted run it continues, in place."""
    if not cfg.resume or has_checkpoint(run_dir / "checkpoints"):
        return run_dir
    previous = find_resumable_run(run_dir, overrides)
    if previous is None:
        log.warning("resume=true: no interrupted run with these overrides under %s; starting afresh",
                    run_dir.parent.parent)
        return run_dir
    continue_in_place(previous, run_dir, _STARTED)  # its log goes on in its own kdrun.log; no second directory
    log.info("resume=true: continuing the interrupted run in %s", previous)
    return previous


def _run(cfg: DictConfig, run_dir: Path, overrides: list[str], multirun: bool) -> Optional[float]:
    try:
        validate(cfg)
        done = completed_metrics(run_dir, overrides) if multirun else None
        if done is not None:
            log.info("%s: completed earlier with these overrides (metrics.json); skipping it", run_dir.name)
            return objective(done)
        from kdrun.run.pipeline import run_experiment  # heavy: torch, timm, torchvision

        if not multirun:
            log.info("run directory: %s", _shown(run_dir))
        metrics = run_experiment(cfg, run_dir, overrides)
        log.info("wrote metrics.json, checkpoints/, kdrun.log and TensorBoard events to %s", _shown(run_dir))
        return objective(metrics)
    except Exception as raised:
        error = as_user_error(raised)
        if error is None and _is_config_error(raised):  # e.g. an interpolation `${...}` that names no key
            error = KdrunError(hydra_error_line(raised))
        if error is None:  # a bug, not bad input
            if not multirun:
                raise
            log.exception("job failed")  # its traceback goes to the job's log
            error = KdrunError(f"{type(raised).__name__}: {raised}")
        # metrics.json says failed or diverged; in a sweep always, so that the report and failed_jobs()
        # see jobs that ran in other processes.
        record_failure(error, run_dir, always=multirun)
        if not multirun:
            _log_to_file_only(f"error: {one_line(error)}")  # main() prints it once on stderr
            _run_error.append(error)
            return None
        # In a sweep one bad job must not stop the others; no objective: Optuna marks the trial failed.
        log.error("job %s: %s", status_of(error), one_line(error))
        return None


def _shown(path: Path) -> str:
    """`path` relative to the working directory when it lies inside it, as users type it."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def _log_to_file_only(message: str) -> None:
    record = log.makeRecord(log.name, logging.ERROR, __file__, 0, message, None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def _discard_empty_run_dir() -> None:
    """A run that failed before doing any work leaves no half-written directory behind."""
    for run_dir in _current_run_dir:
        if run_dir.is_dir() and not has_work(run_dir) and not run_is_live(run_dir):
            logging.shutdown()
            shutil.rmtree(run_dir, ignore_errors=True)
            try:
                run_dir.parent.rmdir()  # outputs/runs/<date>/ when it held only this run
            except OSError:
                pass


def main() -> None:
    # Hydra prints compose errors over several lines; let them reach us and print one line instead.
    os.environ.setdefault("HYDRA_FULL_ERROR", "1")
    show_traceback = os.environ.get("KDRUN_TRACEBACK") == "1"
    if any(arg in ("-h", "--help") for arg in sys.argv[1:]):
        _print_help(sys.argv[1:])
        return
    try:
        sys.argv[1:] = worker_argv(preflight(sys.argv[1:]))  # torchrun: only rank 0 writes the run dir
        remember_swept_keys(sys.argv[1:])
        hydra_entry()
        if _run_error:
            raise _run_error[0]
    except (KdrunError, OSError) as raised:
        error = as_user_error(raised)  # an OSError here: Hydra could not create the run directory
        if error is None and _is_config_error(raised):  # Hydra's MissingConfigException is an OSError too
            error = KdrunError(hydra_error_line(raised))
        if error is None or show_traceback:
            raise
        _discard_empty_run_dir()
        print(f"kdrun: error: {one_line(error)}", file=sys.stderr)
        sys.exit(exit_code(error))
    except KeyboardInterrupt:
        print("kdrun: interrupted; continue later with resume=true (or rerun into the same directory)",
              file=sys.stderr)
        sys.exit(130)
    except Exception as error:  # Hydra's composition and override errors; a sweeper stopped by failed jobs
        failed = failed_jobs()  # e.g. Optuna has no best trial to report when every trial failed
        if show_traceback or not (failed or _is_config_error(error)):
            raise
        if failed:
            print(f"kdrun: error: {_failed_summary(failed)}; the sweep stopped: {hydra_error_line(error)}", file=sys.stderr)
            sys.exit(1)
        _discard_empty_run_dir()
        print(f"kdrun: error: {hydra_error_line(error)}", file=sys.stderr)
        sys.exit(2)
    failed = failed_jobs()
    if failed:
        print(f"kdrun: error: {_failed_summary(failed)}", file=sys.stderr)
        sys.exit(1)


def _print_help(args: list[str]) -> None:
    """kdrun's page, or with `--help TOPIC` that section of the README."""
    from kdrun.cli.help import help_text, topic_text

    at = next(i for i, arg in enumerate(args) if arg in ("-h", "--help"))
    topic = args[at + 1] if at + 1 < len(args) else ""
    try:
        if topic and "=" not in topic and not topic.startswith("-"):
            print(topic_text(topic))
        else:
            print(help_text())
    except KdrunError as error:
        print(f"kdrun: error: {one_line(error)}", file=sys.stderr)
        sys.exit(2)
    except BrokenPipeError:  # `kdrun --help | head`: the reader has what it wanted
        sys.stderr.close()


def _failed_summary(failed: list[str]) -> str:
    return f"{len(failed)} sweep job(s) did not complete: " + "; ".join(failed)


def _is_config_error(error: Exception) -> bool:
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    return isinstance(error, (HydraException, OmegaConfBaseException))


if __name__ == "__main__":
    main()

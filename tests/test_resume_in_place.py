"""resume=true continues the interrupted run in its own directory and log; a killed run reads as interrupted
(issue #19, point 5). Unit tests: no training, only directories, logging handlers and processes that hold locks."""
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kdrun.run.resume import continue_in_place, find_resumable_run
from kdrun.run_files import RUN_LOCK, holding_run, run_is_live
from kdrun.sweeps.report import build_report


def make_run(directory: Path, overrides: list[str], checkpoint: bool = True) -> Path:
    (directory / ".hydra").mkdir(parents=True)
    (directory / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    (directory / "kdrun.log").write_text("[10:00:00][kdrun][INFO] - student epoch 1/6: ...\n")
    if checkpoint:
        (directory / "checkpoints").mkdir()
        (directory / "checkpoints" / "last.pt").write_bytes(b"weights")
    return directory


@pytest.fixture
def hydra_log():
    """A FileHandler on the root logger, as Hydra's job logging sets one up for each run directory."""
    root = logging.getLogger()
    before = list(root.handlers)
    handlers = []

    def open_log(run_dir: Path) -> logging.FileHandler:
        handler = logging.FileHandler(run_dir / "kdrun.log")
        handler.setFormatter(logging.Formatter("[%(name)s][%(levelname)s] - %(message)s"))
        root.addHandler(handler)
        handlers.append(handler)
        return handler

    yield open_log
    for handler in list(root.handlers):
        if handler not in before:
            root.removeHandler(handler)
            handler.close()


def test_resumed_run_logs_into_its_own_directory_and_leaves_no_husk(tmp_path, hydra_log):
    runs = tmp_path / "outputs" / "runs"
    interrupted = make_run(runs / "2024-01-01" / "10-00-00", ["T=2"])
    husk = runs / "2024-01-02" / "09-00-00"  # the directory Hydra made for `kdrun T=2 resume=true` the next day
    since = time.time() - 1
    (husk / ".hydra").mkdir(parents=True)
    (husk / ".hydra" / "overrides.yaml").write_text("- T=2\n- resume=true\n")
    hydra_log(husk)
    assert find_resumable_run(husk, ["T=2", "resume=true"]) == interrupted

    continue_in_place(interrupted, husk, since)
    logging.getLogger("kdrun").warning("student epoch 2/6: continued")
    assert not husk.exists() and not husk.parent.exists()  # no husk, no empty date folder
    lines = (interrupted / "kdrun.log").read_text().splitlines()
    assert lines[0].startswith("[10:00:00]") and lines[-1].endswith("student epoch 2/6: continued")
    assert build_report(runs).swept == []  # nothing else is left for the report to compare with


def test_a_named_directory_with_earlier_files_is_kept(tmp_path, hydra_log):
    interrupted = make_run(tmp_path / "runs" / "a" / "cut", ["T=2"])
    named = make_run(tmp_path / "runs" / "a" / "mine", ["T=2"], checkpoint=False)  # hydra.run.dir=... of the user
    old = time.time() - 3600
    for path in [named / "kdrun.log", named / ".hydra" / "overrides.yaml"]:
        os.utime(path, (old, old))
    hydra_log(named)
    continue_in_place(interrupted, named, time.time() - 1)
    logging.getLogger("kdrun").warning("continued")
    assert (named / "kdrun.log").read_text().count("\n") == 1  # what it held stays, nothing was added to it
    assert (interrupted / "kdrun.log").read_text().endswith("continued\n")


def _hold_in_child(run_dir: Path) -> subprocess.Popen:
    code = ("import sys, time; from pathlib import Path; from kdrun.run_files import holding_run\n"
            "with holding_run(Path(sys.argv[1])):\n    print('held', flush=True); time.sleep(600)")
    child = subprocess.Popen([sys.executable, "-c", code, str(run_dir)], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "held"
    return child


@pytest.mark.parametrize("signal_number", [signal.SIGKILL, signal.SIGTERM])
def test_a_killed_run_reads_as_interrupted_and_can_be_resumed(tmp_path, signal_number):
    runs = tmp_path / "runs"
    run_dir = make_run(runs / "d" / "t", ["T=2"])
    child = _hold_in_child(run_dir)
    try:
        assert run_is_live(run_dir)
        assert [run.status for run in build_report(runs).runs] == ["running"]
        assert find_resumable_run(runs / "d" / "new", ["T=2"]) is None  # a live run is nobody else's to resume
    finally:
        child.send_signal(signal_number)
        child.wait()
    assert (run_dir / RUN_LOCK).is_file()  # a killed process cleans nothing up; the kernel drops its lock
    assert not run_is_live(run_dir)
    assert [run.status for run in build_report(runs).runs] == ["interrupted"]
    assert find_resumable_run(runs / "d" / "new", ["T=2", "resume=true"]) == run_dir


def test_a_run_that_ended_leaves_no_lock_and_reads_by_its_metrics(tmp_path):
    run_dir = make_run(tmp_path / "run", ["T=2"])
    with holding_run(run_dir):
        (run_dir / "metrics.json").write_text(json.dumps({"status": "failed", "error": "x"}))
    assert not (run_dir / RUN_LOCK).exists() and not run_is_live(run_dir)
    assert build_report(run_dir).runs[0].status == "failed"

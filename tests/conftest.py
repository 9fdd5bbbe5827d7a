"""Shared fixtures: run the real `kdrun` command in a subprocess on tiny models and data; and the split of
the suite into a fast unit layer and the slow, end-to-end one.

Two layers, told apart by markers that pytest_collection_modifyitems below adds:

- `e2e`: a test that starts the real `kdrun` command in a subprocess (the `kdrun` and `run_kdrun`
  fixtures, tests/cli_batch.py, torchrun), or trains several stages of a run (run_experiment).
- `slow`: every `e2e` test, and the unit tests that train long enough to matter (marked in their files,
  or listed in SLOW_UNIT_TESTS here).

    python -m pytest -q -n 2 --dist loadfile   # everything, in two workers (the README's command, and CI's)
    python -m pytest -q -m "not slow"   # the fast unit layer only
    python -m pytest -q -m "not e2e"    # every unit test, the slow ones too
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# The README's command runs the suite in two pytest-xdist workers (one per core of a 2-core machine): one torch
# thread in each, and in the kdrun processes they start, keeps them from competing for the cores. Set before
# any test module imports torch.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
# The runs' speed figures: 5 timed rounds each, not the 1 s a user's run spends on each (the tests check the
# figures' keys and relations, not their precision).
os.environ.setdefault("KDRUN_TIMING_BUDGET_S", "0")

# Tiny, fast experiment: 16x16 synthetic images, CIFAR-style ResNet-8 student, ResNet-14 teacher.
_TINY = (
    "dataset=synthetic", "dataset.image_size=16", "dataset.train_size=320", "dataset.test_size=64",
    "teacher.name=cifar:resnet14", "student.name=cifar:resnet8", "epochs=4", "batch_size=32",
    "optim=sgd", "lr=0.05",
    "progress=false", "tb_figures=0",  # figures cost ~0.4 s each; the tests that check them ask for them
)

# Measurements of time, not results: wall-clock seconds of the run and of each epoch, and the
# timed inference speed (latency, throughput, and speedup, their ratio), with the spread of the timed
# runs and whether it was narrow enough to trust. They vary from run to run on any machine; every other
# value of metrics.json must be identical between equivalent runs.
TIMED_KEYS = {"seconds", "latency_ms", "throughput", "speedup", "latency_spread", "throughput_spread",
              "timing_reliable"}


def _run_kdrun(args: list[str], cwd: Path, timeout: float = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("KDRUN_TRACEBACK", None)
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run([sys.executable, "-m", "kdrun.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=env)


def _read_metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def _without_timings(value):
    if isinstance(value, dict):
        return {k: _without_timings(v) for k, v in value.items() if k not in TIMED_KEYS}
    if isinstance(value, list):
        return [_without_timings(v) for v in value]
    return value


# The helpers are session-scoped so that module-scoped fixtures (one run shared by a file's checks) can use them.

@pytest.fixture(scope="session")
def tiny_args() -> tuple[str, ...]:
    """The overrides of the tiny experiment (a tuple: shared, so it must not change)."""
    return _TINY


@pytest.fixture(scope="session")
def run_kdrun():
    """run_kdrun(args, cwd, timeout=900): runs `python -m kdrun.cli ARGS` in cwd; the completed process."""
    return _run_kdrun


@pytest.fixture(scope="session")
def read_metrics():
    """read_metrics(run_dir): the run's metrics.json as a dict."""
    return _read_metrics


@pytest.fixture(scope="session")
def without_timings():
    """without_timings(value): metrics with every TIMED_KEYS entry dropped, at any depth."""
    return _without_timings


@pytest.fixture
def kdrun(tmp_path):
    """Call as kdrun(*args): runs kdrun in tmp_path and returns the completed process."""
    def call(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
        return _run_kdrun(list(args), tmp_path, timeout)
    return call


# --- the two layers --------------------------------------------------------------------------------

# Files whose every test is end-to-end.
E2E_FILES = {
    "test_cli_run.py",        # full runs of the CLI: outputs, cache reuse, resume after SIGKILL, progress bars
    "test_determinism.py",    # the same CLI run twice, then torn files and a rerun
    "test_methods_cli.py",    # every method through a `kdrun -m` sweep, a timm pair ...
    "test_methods_cli_torchvision.py",  # ... and a torchvision pair
    "test_sweep_plugins.py",  # joblib / submitit / optuna sweeps of the CLI
    "test_sweep_report.py",   # a 4-job CLI sweep and kdrun-report on it
    "test_packaging.py",      # builds the wheel, runs the installed CLI
    "test_help.py",           # `python -m kdrun.cli --help`
}
# A test that uses one of these fixtures (directly or through another fixture) starts the CLI.
E2E_FIXTURES = {
    "kdrun", "run_kdrun",               # conftest: `python -m kdrun.cli`
    "light_results", "heavy_results",   # test_errors: the catalogue through tests/cli_batch.py
}
# Single end-to-end tests in files that are otherwise unit tests: file -> test names (without parameters).
E2E_TESTS = {
    "test_distributed.py": {"test_torchrun_two_processes_gloo"},                    # torchrun, 2 processes
    "test_sweeps.py": {"test_missing_plugin_from_the_command_line_is_one_line"},    # kdrun.cli in a subprocess
    "test_paradigms.py": {"test_each_generation_distils_from_the_saved_previous_generation"},  # run_experiment
}
# Unit tests slow enough to leave out of the fast layer, besides those marked slow in their files: file -> test
# names. None at present: the whole unit layer (`-m "not slow"`, ~410 tests) took 57 s on 2 CPU cores, its
# slowest test 2 s (`--durations=0`).
SLOW_UNIT_TESTS: dict[str, set[str]] = {}


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(config, items):
    for item in items:
        file = item.path.name
        name = getattr(item, "originalname", item.name)  # without the parameters of a parametrized test
        if (file in E2E_FILES or E2E_FIXTURES & set(item.fixturenames)
                or name in E2E_TESTS.get(file, ())):
            item.add_marker(pytest.mark.e2e)
            item.add_marker(pytest.mark.slow)
        elif name in SLOW_UNIT_TESTS.get(file, ()):
            item.add_marker(pytest.mark.slow)

"""Shared fixtures: run the real `kdrun` command in a subprocess on tiny models and data."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# Tiny, fast experiment: 16x16 synthetic images, CIFAR-style ResNet-8 student, ResNet-14 teacher.
_TINY = (
    "dataset=synthetic", "dataset.image_size=16", "dataset.train_size=320", "dataset.test_size=64",
    "teacher.name=cifar:resnet14", "student.name=cifar:resnet8", "epochs=4", "batch_size=32",
    "optim=sgd", "lr=0.05",
    "progress=false", "tb_figures=0",  # figures cost ~0.4 s each; the tests that check them ask for them
)

# Measurements of time, not results: wall-clock seconds of the run and of each epoch, and the
# timed inference speed (latency, throughput, and speedup, their ratio). They vary from run to run
# on any machine; every other value of metrics.json must be identical between equivalent runs.
TIMED_KEYS = {"seconds", "latency_ms", "throughput", "speedup"}


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

"""Sweep plumbing without training: plugin checks, job names, skipping completed jobs, failures, presets."""
import json
import os
import subprocess
import sys
import textwrap
import time

import pytest
import yaml

from kdrun.errors import KdrunError


# --- a missing plugin names the extra to install ------------------------------------------------------

@pytest.mark.parametrize("arg, extra, package", [
    ("hydra/launcher=joblib", "joblib", "hydra-joblib-launcher"),
    ("hydra/launcher=submitit_local", "slurm", "hydra-submitit-launcher"),
    ("hydra/launcher=kdrun_slurm", "slurm", "hydra-submitit-launcher"),
    ("hydra/sweeper=optuna", "optuna", "hydra-optuna-sweeper"),
    ("hparams_search=kd_optuna", "optuna", "hydra-optuna-sweeper"),
])
def test_missing_plugin_names_the_extra(monkeypatch, arg, extra, package):
    import importlib.util

    from kdrun.cli.plugins import check_plugins

    looked_up = []

    def find_spec(name, *args):
        looked_up.append(name)
        return None if name.startswith("hydra_plugins.") else object()

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(KdrunError) as excinfo:
        check_plugins(["-m", "T=1,4", arg])
    assert str(excinfo.value) == (f'{arg} needs the Hydra plugin {package}, which is not installed: '
                                  f'pip install "kdrun[{extra}]"')
    assert looked_up and all(name.startswith("hydra_plugins.") or name in ("joblib", "submitit", "optuna")
                             for name in looked_up)


def test_installed_plugin_and_plain_overrides_pass(monkeypatch):
    import importlib.util

    from kdrun.cli.plugins import check_plugins

    looked_up = []
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: looked_up.append(name) or object())
    check_plugins(["-m", "T=1,4", "hydra/launcher=joblib", "hydra/launcher=basic", "alpha=0.5"])
    assert looked_up == ["hydra_plugins.hydra_joblib_launcher", "joblib"]
    looked_up.clear()
    check_plugins(["T=4", "hydra/launcher=basic", "hydra.launcher.n_jobs=2"])
    assert looked_up == []


def test_missing_plugin_from_the_command_line_is_one_line(tmp_path):
    """The real CLI, with the joblib launcher hidden from imports as if it were not installed."""
    script = textwrap.dedent("""
        import sys

        class Hide:
            def find_spec(self, name, path=None, target=None):
                if name == "hydra_plugins.hydra_joblib_launcher" or name.startswith("hydra_plugins.hydra_joblib_launcher."):
                    raise ModuleNotFoundError(name)
                return None

        sys.meta_path.insert(0, Hide())
        sys.argv = ["kdrun", "-m", "T=1,4", "hydra/launcher=joblib"]
        from kdrun.cli.main import main
        main()
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={k: v for k, v in os.environ.items() if k not in ("KDRUN_TRACEBACK", "HYDRA_FULL_ERROR")})
    assert proc.returncode == 2
    assert proc.stderr == ('kdrun: error: hydra/launcher=joblib needs the Hydra plugin hydra-joblib-launcher, '
                           'which is not installed: pip install "kdrun[joblib]"\n')
    assert not (tmp_path / "outputs").exists()


# --- job directory names ------------------------------------------------------------------------------

def test_job_dirname_uses_remembered_keys_and_the_sweepers_params(monkeypatch):
    from kdrun.sweeps.names import SWEPT_KEYS_ENV, job_dirname, remember_swept_keys

    # A submitit job runs in a process whose sys.argv is submitit's, not kdrun's.
    monkeypatch.setattr("sys.argv", ["-m", "submitit.core._submit", "/tmp/folder"])
    monkeypatch.delenv(SWEPT_KEYS_ENV, raising=False)
    job = ["T=4", "epochs=1", "student.name=cifar\\:resnet8"]
    assert job_dirname(job) == "T=4,epochs=1,student.name=cifar_resnet8"  # unknown keys: all, '\' dropped
    remember_swept_keys(["-m", "T=1,4", "epochs=1"])
    assert os.environ[SWEPT_KEYS_ENV] == "T"
    assert job_dirname(job) == "T=4"
    # Optuna: the search space is hydra.sweeper.params, with nothing swept on the command line.
    remember_swept_keys(["-m", "hparams_search=kd_optuna", "epochs=1"])
    trial = ["T=3.5", "alpha=0.71", "epochs=1", "hparams_search=kd_optuna"]
    assert job_dirname(trial, {"T": "tag(log, interval(1.0, 10.0))", "alpha": "interval(0.0, 1.0)"}) == "T=3.5,alpha=0.71"


# --- a job's result, skip and failure -----------------------------------------------------------------

def _write(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def test_objective_is_the_students_best_top1():
    from kdrun.sweeps.jobs import objective

    assert objective({"student": {"top1": 0.5, "best_top1": 0.625}}) == 0.625
    assert objective({"student": {"best_top1": float("nan")}}) is None
    assert objective({"status": "failed", "error": "x"}) is None


def test_completed_job_is_found_only_with_the_same_overrides(tmp_path):
    from kdrun.sweeps.jobs import completed_metrics

    job = tmp_path / "0_T=1"
    stored = {"status": "completed", "overrides": ["T=1", "epochs=1", "progress=false"],
              "student": {"best_top1": 0.25}}
    _write(job / "metrics.json", stored)
    # Order, resume and progress do not matter; any other difference does.
    assert completed_metrics(job, ["epochs=1", "T=1", "resume=true"]) == stored
    assert completed_metrics(job, ["T=1", "epochs=2"]) is None
    assert completed_metrics(job, ["T=1"]) is None
    _write(job / "metrics.json", {**stored, "status": "failed"})
    assert completed_metrics(job, ["T=1", "epochs=1"]) is None
    _write(job / "metrics.json", {k: v for k, v in stored.items() if k != "overrides"})
    assert completed_metrics(job, ["T=1", "epochs=1"]) is None  # written before overrides were recorded
    assert completed_metrics(tmp_path / "nowhere", ["T=1"]) is None


def test_sweep_job_failure_is_recorded_with_its_reason(tmp_path):
    from kdrun.run.failures import record_failure

    record_failure(KdrunError("alpha=1.5 must be within [0, 1]"), tmp_path)
    assert not (tmp_path / "metrics.json").exists()  # a single run that did no work leaves nothing
    record_failure(KdrunError("alpha=1.5 must be within [0, 1]"), tmp_path, always=True)  # a sweep job
    assert json.loads((tmp_path / "metrics.json").read_text()) == {
        "status": "failed", "error": "alpha=1.5 must be within [0, 1]"}


def test_failed_jobs_of_this_sweep_only(tmp_path):
    from kdrun.sweeps.callback import failed_since

    _write(tmp_path / "0_T=1" / "metrics.json", {"status": "failed", "error": "old failure"})
    old = time.time() - 3600
    os.utime(tmp_path / "0_T=1" / "metrics.json", (old, old))
    since = time.time() - 5
    _write(tmp_path / "1_T=4" / "metrics.json", {"status": "failed", "error": "loss became nan"})
    _write(tmp_path / "2_T=8" / "metrics.json", {"status": "diverged", "error": "loss_kd is inf at step 7"})
    _write(tmp_path / "3_T=16" / "metrics.json", {"status": "completed"})
    assert failed_since(tmp_path, since) == ["1_T=4 failed: loss became nan",
                                             "2_T=8 diverged: loss_kd is inf at step 7"]


# --- resume=true for a sweep --------------------------------------------------------------------------

def _sweep(root, name, task, age):
    from kdrun.sweeps.callback import SWEEP_FILE, record_sweep

    record_sweep(root / name, task)
    path = root / name / SWEEP_FILE
    stamp = time.time() - age
    os.utime(path, (stamp, stamp))
    return path.parent


def test_resume_finds_the_newest_sweep_with_the_same_overrides(tmp_path, monkeypatch):
    from kdrun.sweeps.resume import default_sweep_root, find_sweep_to_resume, resume_sweep_args

    root = tmp_path / "outputs" / "multirun"
    _sweep(root, "2026-01-01/09-00-00", ["T=1,4", "epochs=1"], age=300)
    wanted = _sweep(root, "2026-01-01/10-00-00", ["epochs=1", "T=1,4", "progress=false"], age=200)
    _sweep(root, "2026-01-01/11-00-00", ["T=1,4", "epochs=2"], age=100)  # newest, other overrides
    assert find_sweep_to_resume(root, ["T=1,4", "epochs=1", "resume=true"]) == wanted
    assert find_sweep_to_resume(root, ["T=1,8", "epochs=1"]) is None

    monkeypatch.chdir(tmp_path)
    assert default_sweep_root().as_posix() == "outputs/multirun"
    args = ["-m", "T=1,4", "epochs=1", "resume=true", "hydra/launcher=joblib"]
    assert resume_sweep_args(args) == [*args, "hydra.sweep.dir=outputs/multirun/2026-01-01/10-00-00"]
    assert resume_sweep_args(["T=1,4", "epochs=1", "resume=true"]) == ["T=1,4", "epochs=1", "resume=true"]  # no -m
    assert resume_sweep_args(["-m", "T=1,4", "epochs=1"]) == ["-m", "T=1,4", "epochs=1"]  # no resume
    named = ["-m", "T=1,4", "epochs=1", "resume=true", "hydra.sweep.dir=elsewhere"]
    assert resume_sweep_args(named) == named


# --- presets compose ----------------------------------------------------------------------------------

@pytest.fixture
def composed(run_kdrun, tmp_path):
    """composed(*args, package=...): the `package` part of the config `kdrun ARGS --cfg hydra` composes."""
    def compose_in_cli(*args, package):
        proc = run_kdrun([*args, "--cfg", "hydra", "-p", package], tmp_path, timeout=120)
        assert proc.returncode == 0, proc.stderr
        return yaml.safe_load(proc.stdout.split("\n", 1)[1])  # past the "# @package" line
    return compose_in_cli


def test_slurm_preset_composes(composed):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    launcher = composed("hydra/launcher=kdrun_slurm", "hydra.launcher.partition=gpu",
                        "hydra.launcher.timeout_min=90", package="hydra.launcher")
    assert launcher["_target_"] == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert (launcher["partition"], launcher["timeout_min"]) == ("gpu", 90)
    assert (launcher["gpus_per_node"], launcher["tasks_per_node"], launcher["nodes"]) == (1, 1, 1)
    assert launcher["cpus_per_task"] == 8 and launcher["mem_gb"] == 32 and launcher["max_num_timeout"] == 3
    # Unset, the partition is the cluster's default.
    assert composed("hydra/launcher=kdrun_slurm", package="hydra.launcher")["partition"] is None


def test_optuna_presets_compose(composed, run_kdrun, tmp_path):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    sweeper = composed("hparams_search=kd_optuna", package="hydra.sweeper")
    assert sweeper["_target_"] == "hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper"
    assert sweeper["direction"] == "maximize" and sweeper["max_failure_rate"] == 1.0
    assert sweeper["params"] == {"T": "tag(log, interval(1.0, 10.0))", "alpha": "interval(0.0, 1.0)"}
    assert sweeper["sampler"]["_target_"] == "optuna.samplers.TPESampler" and sweeper["sampler"]["seed"] == 0
    dkd = composed("hparams_search=dkd_optuna", package="hydra.sweeper")
    assert set(dkd["params"]) == {"T", "distill.terms.dkd.beta"}
    job = run_kdrun(["hparams_search=dkd_optuna", "--cfg", "job", "-p", "distill.name"], tmp_path, timeout=120)
    assert job.stdout.strip() == "dkd", job.stderr
    # Another sampler replaces the seeded TPE whole (the grid sampler takes no seed).
    grid = composed("hparams_search=kd_optuna", "hydra/sweeper/sampler=grid", package="hydra.sweeper")
    assert grid["sampler"] == {"_target_": "optuna.samplers.GridSampler", "_partial_": True}

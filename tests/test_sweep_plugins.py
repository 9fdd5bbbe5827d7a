"""Real sweeps through Hydra's joblib and submitit launchers and its Optuna sweeper, on tiny models."""
import os

import pytest
import yaml

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def fast(tiny_args):
    """One epoch per stage, no baseline: what these tests check does not need them."""
    return [arg for arg in tiny_args if not arg.startswith("epochs=")] + ["epochs=1", "baseline=false"]


def _jobs(sweep_dir):
    """The job directories of a sweep (not its hidden folders, nor the sweep's own TensorBoard run)."""
    return sorted(p for p in sweep_dir.iterdir() if p.is_dir() and not p.name.startswith(".")
                  and p.name != "sweep_summary")


def _log(job):
    return (job / "kdrun.log").read_text()


def test_joblib_parallel_sweep_trains_the_teacher_once_keeps_going_and_reruns_only_what_failed(kdrun, tmp_path, fast,
                                                                                              read_metrics):
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    # Two parallel jobs; the second diverges (student lr 1e12: status `diverged`) while the first completes.
    args = ["-m", *fast, "student.lr=0.05,1e12", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2"]
    first = kdrun(*args)
    assert first.returncode == 1, first.stderr
    sweep = next((tmp_path / "outputs" / "multirun").glob("*/*"))  # the default, timestamped directory
    good, bad = _jobs(sweep)
    assert (good.name, bad.name) == ("0_student.lr=0.05", "1_student.lr=1000000000000.0")
    assert read_metrics(good)["status"] == "completed"
    failure = read_metrics(bad)
    assert failure["status"] == "diverged" and failure["error"].startswith("student diverged in epoch 1/1: loss=nan") and " at step " in failure["error"]
    assert first.stderr.strip().splitlines()[-1] == f"kdrun: error: 1 sweep job(s) did not complete: {bad.name} diverged: {failure['error']}"
    # Both jobs wanted the same teacher: one trained it, the other waited on the lock and reused it.
    assert first.stderr.count("teacher: training") == 1
    assert sum("teacher: training" in _log(job) for job in (good, bad)) == 1
    assert sum("teacher: reusing cached" in _log(job) for job in (good, bad)) == 1
    assert len(list((tmp_path / "outputs" / "cache" / "teacher").glob("*/model.pt"))) == 1
    good_before = (good / "metrics.json").read_text(), (good / "metrics.json").stat().st_mtime_ns

    # The same sweep again, resume=true: it finds its directory; the completed job is skipped, the failed one re-runs.
    second = kdrun(*args, "resume=true")
    assert second.returncode == 1, second.stderr
    assert f"re-running the sweep in {sweep.relative_to(tmp_path)}" in second.stderr
    assert list((tmp_path / "outputs" / "multirun").glob("*/*")) == [sweep]
    assert "0_student.lr=0.05: completed earlier with these overrides (metrics.json); skipping it" in second.stderr
    assert ((good / "metrics.json").read_text(), (good / "metrics.json").stat().st_mtime_ns) == good_before
    assert second.stderr.count("student epoch") == 0 and second.stderr.count("student diverged") >= 1
    assert _log(bad).count("student diverged in epoch") == 2  # ran twice
    assert second.stderr.strip().splitlines()[-1].startswith("kdrun: error: 1 sweep job(s) did not complete: 1_student.lr=")


def test_submitit_local_sweep(kdrun, tmp_path, fast, read_metrics):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    proc = kdrun("-m", *fast, "T=1,4", "hydra/launcher=submitit_local", "hydra.sweep.dir=sweep", timeout=600)
    assert proc.returncode == 0, proc.stderr
    jobs = _jobs(tmp_path / "sweep")
    # Named after the swept key although submitit runs each job in a process of its own.
    assert [job.name for job in jobs] == ["0_T=1", "1_T=4"]
    metrics = [read_metrics(job) for job in jobs]
    assert [m["status"] for m in metrics] == ["completed", "completed"] and [m["T"] for m in metrics] == [1.0, 4.0]
    assert sorted(m["teacher"]["source"] for m in metrics) == ["cache", "trained"]
    assert len(list((tmp_path / "outputs" / "cache" / "teacher").glob("*/model.pt"))) == 1
    assert list((tmp_path / "sweep" / ".submitit").glob("*/*_result.pkl"))


def test_optuna_search_maximises_the_students_best_top1_and_reruns_skip_its_trials(kdrun, tmp_path, fast, read_metrics):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    args = ["-m", *fast, "hparams_search=kd_optuna", "hydra.sweeper.n_trials=2"]
    proc = kdrun(*args)
    assert proc.returncode == 0, proc.stderr
    sweep = next((tmp_path / "outputs" / "multirun").glob("*/*"))
    jobs = _jobs(sweep)
    assert len(jobs) == 2 and all(job.name.split("_", 1)[1].startswith("T=") and ",alpha=" in job.name
                                  for job in jobs)
    metrics = [read_metrics(job) for job in jobs]
    assert all(m["status"] == "completed" for m in metrics)
    assert all(1.0 <= m["T"] <= 10.0 and 0.0 <= m["alpha"] <= 1.0 for m in metrics)
    assert len({(m["T"], m["alpha"]) for m in metrics}) == 2
    result = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    best = max(m["student"]["best_top1"] for m in metrics)
    assert result["best_value"] == best
    assert any((m["T"], m["alpha"]) == (result["best_params"]["T"], result["best_params"]["alpha"])
               for m in metrics if m["student"]["best_top1"] == best)

    # The seeded sampler asks for the same trials again: both are skipped, with the same result.
    again = kdrun(*args, "resume=true")
    assert again.returncode == 0, again.stderr
    assert again.stderr.count("completed earlier with these overrides") == 2 and "student epoch" not in again.stderr
    assert _jobs(sweep) == jobs
    assert yaml.safe_load((sweep / "optimization_results.yaml").read_text()) == result


def test_optuna_study_goes_on_after_failed_trials(kdrun, tmp_path, read_metrics):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    # alpha=1.5 is fixed (out of the search) and invalid: every trial fails, each one still runs.
    proc = kdrun("-m", "dataset=synthetic", "hparams_search=kd_optuna", "hydra.sweeper.n_trials=2", "alpha=1.5",
                 "hydra.sweep.dir=sweep")
    assert proc.returncode == 1
    jobs = _jobs(tmp_path / "sweep")
    assert len(jobs) == 2
    assert all(read_metrics(job) == {"status": "failed", "error": "alpha=1.5 must be within [0, 1], e.g. alpha=0.9"}
               for job in jobs)
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("kdrun: error: 2 sweep job(s) did not complete: 0_T=") and \
        last.endswith("; the sweep stopped: No trials are completed yet.")
    assert "Traceback" not in proc.stderr
    assert not os.path.exists(tmp_path / "sweep" / "optimization_results.yaml")

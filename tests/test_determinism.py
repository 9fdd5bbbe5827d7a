"""`seed=` fixes everything kdrun controls; a torn checkpoint or cache entry costs an epoch, not the run."""
import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def args(tiny_args):
    return [*tiny_args, "epochs=2", "student.epochs=3", "baseline=false", "seed=7", "hydra.run.dir=run"]


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, run_kdrun, args):
    """The same command twice, each in its own directory with its own stage cache."""
    cwds = [tmp_path_factory.mktemp(name) for name in ("first", "second")]
    for cwd in cwds:
        proc = run_kdrun(args, cwd)
        assert proc.returncode == 0, proc.stderr
    return cwds


def test_two_identical_runs_write_identical_metrics(two_runs, read_metrics, without_timings):
    first, second = (read_metrics(cwd / "run") for cwd in two_runs)
    assert first["seed"] == 7 and first["teacher"]["source"] == second["teacher"]["source"] == "trained"
    assert set(first) - set(without_timings(first)) == {"seconds", "speedup"}
    assert without_timings(first) == without_timings(second)
    # Not vacuous: the runs trained and measured something.
    assert first["teacher"]["top1"] > 0.2 and first["student"]["latency_ms"] > 0  # chance is 0.1
    assert len(first["history"]) == 3 and first["history"][0]["loss"] != first["history"][-1]["loss"]


def test_torn_last_checkpoint_and_cache_entry_resume_to_the_same_result(two_runs, args, run_kdrun, read_metrics,
                                                                       without_timings):
    """Tear the second run's last.pt and its cached teacher, rerun into the same directory: the student
    resumes from last.prev.pt (one epoch back), the teacher is rebuilt (a finished entry keeps no resume
    state), and the result equals the untouched first run's."""
    first_cwd, cwd = two_runs
    run = cwd / "run"
    last = run / "checkpoints" / "last.pt"
    (teacher_model,) = (cwd / "outputs" / "cache" / "teacher").glob("*/model.pt")
    for torn in (last, teacher_model):
        data = torn.read_bytes()
        torn.write_bytes(data[: len(data) // 2])
    (run / "metrics.json").unlink()

    proc = run_kdrun(args, cwd)
    assert proc.returncode == 0, proc.stderr
    assert f"student: {last} is unreadable (" in proc.stderr
    assert f"student: resuming from {last.with_name('last.prev.pt')} (epoch 2/3 done)" in proc.stderr
    assert "teacher cache: " in proc.stderr and "(model.pt does not match its recorded sha256)" in proc.stderr
    assert "teacher: training cifar:resnet14 for 2 epochs" in proc.stderr
    assert (last.parent / "last.pt.corrupt").is_file() and teacher_model.is_file()
    assert (teacher_model.parent.with_name(teacher_model.parent.name + ".corrupt") / "model.pt").is_file()

    expected, resumed = read_metrics(first_cwd / "run"), read_metrics(run)
    assert resumed["status"] == "completed"
    for role in ("teacher", "student"):
        assert without_timings(resumed[role]) == without_timings(expected[role]), role
    assert without_timings(resumed["history"]) == without_timings(expected["history"])

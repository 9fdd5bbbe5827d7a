"""A real Hydra multirun: jobs in their own override-named directories, one teacher and baseline.

The sweep is end-to-end (tests/conftest.py marks it e2e and slow, as every test that uses the `kdrun` fixture);
the job-name check below is a unit test."""


def test_two_job_sweep_trains_teacher_and_baseline_once(kdrun, tmp_path, tiny_args, read_metrics):
    proc = kdrun("-m", *tiny_args, "T=1,4", "hydra.sweep.dir=sweep")
    assert proc.returncode == 0, proc.stderr
    folders = sorted(p for p in (tmp_path / "sweep").iterdir() if p.is_dir() and not p.name.startswith("."))
    assert folders[-1].name == "sweep_summary"  # the sweep's own TensorBoard run, beside its jobs
    jobs = folders[:-1]
    assert [p.name for p in jobs] == ["0_T=1", "1_T=4"]
    metrics = [read_metrics(job) for job in jobs]
    assert [m["T"] for m in metrics] == [1.0, 4.0]
    assert [m["teacher"]["source"] for m in metrics] == ["trained", "cache"]
    assert [m["baseline"]["source"] for m in metrics] == ["trained", "cache"]
    assert proc.stderr.count("teacher: training") == 1
    assert len(list((tmp_path / "outputs" / "cache" / "teacher").glob("*/model.pt"))) == 1
    assert len(list((tmp_path / "outputs" / "cache" / "baseline").glob("*/model.pt"))) == 1
    # One teacher for both jobs: identical teacher accuracy.
    assert metrics[0]["teacher"]["top1"] == metrics[1]["teacher"]["top1"]


def test_job_directory_names_keep_only_swept_keys(monkeypatch):
    from kdrun.sweeps.names import job_dirname, swept_keys

    argv = ["kdrun", "-m", "T=1,4", "alpha=range(0.1,0.5,0.2)", "epochs=3", "student.name=cifar:resnet8",
            "dataset.mean=[0.5,0.5]"]
    assert swept_keys(argv[1:]) == {"T", "alpha"}
    monkeypatch.setattr("sys.argv", argv)
    assert job_dirname(["T=4", "alpha=0.3", "epochs=3", "student.name=cifar:resnet8"]) == "T=4,alpha=0.3"
    monkeypatch.setattr("sys.argv", ["kdrun", "-m", "student.name=cifar:resnet8"])
    assert job_dirname(["student.name=cifar:resnet8"]) == "student.name=cifar_resnet8"

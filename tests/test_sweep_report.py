"""A real 4-job sweep on synthetic data: the report its callback writes, kdrun-report on it, and what
each job left in TensorBoard (HParams row, reference curves, soft-target figures, layout), the sweep's own
run (HParams config, report table and plots) and the cache runs' names. One sweep for all."""
import csv
import subprocess
import sys

import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import metadata as hparams_metadata

pytestmark = pytest.mark.slow
JOBS = {"0_T=1,alpha=0.5": (1.0, 0.5), "1_T=1,alpha=0.9": (1.0, 0.9), "2_T=4,alpha=0.5": (4.0, 0.5),
        "3_T=4,alpha=0.9": (4.0, 0.9)}


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, tiny_args, run_kdrun):
    cwd = tmp_path_factory.mktemp("sweep_report")
    args = [arg for arg in tiny_args if not arg.startswith(("epochs=", "tb_figures="))] + ["epochs=2", "tb_figures=2"]
    proc = run_kdrun(["-m", *args, "T=1,4", "alpha=0.5,0.9", "hydra.sweep.dir=sweep"], cwd, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return cwd / "sweep", proc


def events_of(run_dir):
    return EventAccumulator(str(run_dir), size_guidance={"images": 0, "scalars": 0, "tensors": 0}).Reload()


def test_the_multirun_callback_wrote_the_report_into_the_sweep_dir(sweep):
    sweep_dir, proc = sweep
    assert sorted(p.name for p in sweep_dir.iterdir() if p.is_dir() and not p.name.startswith(".")) == sorted(
        [*JOBS, "sweep_summary"])
    for name in ("summary.csv", "summary.md", "student_top1_vs_T.png", "student_top1_vs_alpha.png"):
        assert (sweep_dir / name).is_file(), name
    assert "4 run(s) in sweep (swept: T, alpha)" in proc.stdout
    for name in ("student_top1_vs_T.png", "student_top1_vs_alpha.png"):
        path = sweep_dir / name
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        with Image.open(path) as image:
            image.verify()
        with Image.open(path) as image:
            assert image.format == "PNG" and image.size == (600, 400)


def test_summary_csv_has_one_row_per_job_with_its_metrics(sweep, read_metrics):
    sweep_dir, _ = sweep
    rows = list(csv.DictReader((sweep_dir / "summary.csv").open()))
    assert [row["paths"] for row in rows] == list(JOBS)
    for row in rows:
        metrics = read_metrics(sweep_dir / row["paths"])
        assert (float(row["T"]), float(row["alpha"])) == JOBS[row["paths"]] == (metrics["T"], metrics["alpha"])
        student = metrics["student"]
        expected = {"teacher_top1": metrics["teacher"]["top1"], "baseline_top1": metrics["baseline"]["top1"],
                    "student_best_top1": student["best_top1"], "student_last_top1": student["last_top1"],
                    "gain": metrics["gain_over_baseline"], "agreement": student["agreement"],
                    "student_ece": student["ece"], "student_params": student["params"],
                    "student_latency_ms": student["latency_ms"]}
        assert {key: float(row[key]) for key in expected} == pytest.approx(expected, rel=1e-12)
        assert row["status"] == "completed" and row["runs"] == "1"


def test_kdrun_report_prints_the_same_table(sweep, read_metrics):
    sweep_dir, _ = sweep
    proc = subprocess.run([sys.executable, "-m", "kdrun.sweeps.report", str(sweep_dir)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[1].split()[:2] == ["T", "alpha"] and len(lines) == 2 + 4 + 1
    for line, job in zip(lines[2:6], JOBS):
        metrics = read_metrics(sweep_dir / job)
        cells = line.split()
        assert [float(c) for c in cells[:2]] == list(JOBS[job])
        assert cells[2] == f"{100 * metrics['teacher']['top1']:.2f}"
        assert cells[5] == f"{100 * metrics['student']['last_top1']:.2f}"
        assert cells[6] == f"{100 * metrics['gain_over_baseline']:+.2f}"
        assert cells[-1] == "completed"


def test_each_job_holds_its_hparams_and_final_metrics_and_no_extra_runs(sweep, read_metrics):
    sweep_dir, _ = sweep
    event_dirs = {path.parent for path in sweep_dir.rglob("events.out.tfevents.*")}
    # one TensorBoard run per job and the sweep's own, nothing else
    assert event_dirs == {sweep_dir / job for job in JOBS} | {sweep_dir / "sweep_summary"}
    for job, (T, alpha) in JOBS.items():
        events = events_of(sweep_dir / job)
        content = events.PluginTagToContent("hparams")
        start = hparams_metadata.parse_session_start_info_plugin_data(content[hparams_metadata.SESSION_START_INFO_TAG])
        values = {k: (v.string_value if v.HasField("string_value") else v.number_value)
                  for k, v in start.hparams.items()}
        assert values["T"] == T and values["alpha"] == pytest.approx(alpha) and values["job"] == job
        assert {k: values[k] for k in ("teacher", "student", "dataset", "method", "epochs", "lr", "batch_size",
                                       "seed", "dataset.image_size")} == {
            "teacher": "cifar:resnet14", "student": "cifar:resnet8", "dataset": "synthetic", "method": "kd",
            "epochs": 2, "lr": pytest.approx(0.05), "batch_size": 32, "seed": 0, "dataset.image_size": 16}
        assert hparams_metadata.EXPERIMENT_TAG not in content  # the sweep's run holds the config
        metrics = read_metrics(sweep_dir / job)
        student = metrics["student"]
        # the HParams metrics are the last points of per-epoch curves: the numbers of metrics.json
        last = {tag: events.Scalars(tag)[-1].value for tag in ("epoch/val_top1", "epoch/gain_over_baseline",
                                                                 "epoch/agreement", "epoch/ece", "epoch/kl_T")}
        assert last == pytest.approx({"epoch/val_top1": student["top1"], "epoch/ece": student["ece"],
                                      "epoch/gain_over_baseline": metrics["gain_over_baseline"],
                                      "epoch/agreement": student["agreement"], "epoch/kl_T": student["kl_T"]},
                                     rel=1e-4, abs=1e-6)
        assert not [tag for tag in events.Tags()["scalars"] if tag.startswith("final/")]
        # the teacher's and baseline's real curves, as their cache entries recorded them
        for role in ("teacher", "baseline"):
            cached = torch.load(sweep_dir.parent / metrics[role]["path"], weights_only=True)["history"]  # cwd-relative
            curve = events.Scalars(f"epoch/{role}_val_top1")
            assert [(e.step, e.value) for e in curve] == [
                (h["epoch"], pytest.approx(h["val_top1"])) for h in cached], (job, role)


def test_the_sweep_run_holds_the_hparams_config_the_table_and_the_plots(sweep):
    sweep_dir, _ = sweep
    events = events_of(sweep_dir / "sweep_summary")
    experiment = hparams_metadata.parse_experiment_plugin_data(
        events.PluginTagToContent("hparams")[hparams_metadata.EXPERIMENT_TAG])
    infos = [info for info in experiment.hparam_infos]
    assert [info.name for info in infos][:6] == ["T", "alpha", "teacher", "student", "method", "job"]
    assert {info.name for info in infos if info.differs} == {"T", "alpha", "teacher", "student", "method"}
    assert (infos[0].domain_interval.min_value, infos[0].domain_interval.max_value) == (1.0, 4.0)
    assert [v.string_value for v in infos[5].domain_discrete.values] == sorted(JOBS)
    assert [m.display_name for m in experiment.metric_infos][:5] == [
        "student top-1", "gain over baseline", "agreement with teacher", "student ECE", "KL(T) to teacher"]
    (text,) = events.Tensors("report/table/text_summary")
    # summary.md's table (its title line names the root as given: kdrun-report above wrote it again)
    table = text.tensor_proto.string_val[0].decode().splitlines()
    assert table[0].startswith("# kdrun report:") and table[1:] == (sweep_dir / "summary.md").read_text().splitlines()[1:]
    assert sorted(events.Tags()["images"]) == ["report/student_top1_vs_T", "report/student_top1_vs_alpha"]
    (plot,) = events.Images("report/student_top1_vs_T")
    assert (plot.width, plot.height) == (600, 400)


def test_cache_runs_are_named_after_stage_model_dataset_and_key(sweep):
    sweep_dir, _ = sweep
    cache = sweep_dir.parent / "outputs" / "cache"
    runs = sorted(path.parent.relative_to(cache) for path in cache.rglob("events.out.tfevents.*"))
    assert [(run.parts[0], run.parts[2], run.parts[3]) for run in runs] == [
        ("baseline", "tb", f"baseline-cifar_resnet8-synthetic-{runs[0].parts[1][:6]}"),
        ("teacher", "tb", f"teacher-cifar_resnet14-synthetic-{runs[1].parts[1][:6]}")]


def test_each_job_has_soft_target_figures_reliability_and_layout(sweep):
    from tensorboard.plugins.custom_scalar import metadata as custom_metadata

    sweep_dir, _ = sweep
    events = events_of(sweep_dir / "2_T=4,alpha=0.5")
    images = events.Tags()["images"]
    assert sorted(images) == ["calibration/reliability", *(f"soft_targets/image_{i}" for i in range(2))]
    assert "calibration/teacher" in events_of(sweep_dir / "0_T=1,alpha=0.5").Tags()["images"]  # once, in job 0
    assert [image.step for image in events.Images("soft_targets/image_0")] == [1, 2]  # every epoch
    assert [image.step for image in events.Images("calibration/reliability")] == [2]  # at the end
    assert custom_metadata.CONFIG_SUMMARY_TAG in events.Tags()["tensors"]

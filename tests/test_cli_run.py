"""End-to-end runs of the real `kdrun` command on tiny models and synthetic data."""
import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, tiny_args, run_kdrun):
    """One full run (teacher, baseline, distill), shared by the checks below."""
    cwd = tmp_path_factory.mktemp("e2e")
    run_dir = cwd / "run1"
    proc = run_kdrun([*tiny_args, "T=3", f"hydra.run.dir={run_dir}"], cwd)
    assert proc.returncode == 0, proc.stderr
    return cwd, run_dir, proc


def test_run_writes_every_output(first_run, tiny_args, read_metrics):
    """Every file of the run directory holds this run: its config, overrides, log, metrics, checkpoints and
    TensorBoard curves agree with the command line, with each other and with the printed table."""
    _, run_dir, proc = first_run
    metrics = read_metrics(run_dir)
    teacher, baseline, student = metrics["teacher"], metrics["baseline"], metrics["student"]

    # .hydra/: the overrides as given (Hydra's own, hydra.run.dir, left out), and the config they composed.
    overrides = [*tiny_args, "T=3"]
    assert yaml.safe_load((run_dir / ".hydra" / "overrides.yaml").read_text()) == overrides
    assert metrics["overrides"] == overrides
    config = yaml.safe_load((run_dir / ".hydra" / "config.yaml").read_text())
    assert (config["teacher"]["name"], config["student"]["name"]) == ("cifar:resnet14", "cifar:resnet8")
    assert {k: config["dataset"][k] for k in ("name", "image_size", "train_size", "test_size")} == {
        "name": "synthetic", "image_size": 16, "train_size": 320, "test_size": 64}
    assert (config["epochs"], config["batch_size"], config["lr"], config["T"]) == (4, 32, 0.05, 3)
    assert config["distill"]["name"] == metrics["method"] == "kd" and config["optim"]["name"] == "sgd"

    # The printed table: one row per model, its cells those of metrics.json.
    rows = {line.split()[0]: line.split()[1:] for line in proc.stdout.splitlines()
            if line.split()[:1] in (["teacher"], ["baseline"], ["distilled"])}
    for label, role in (("teacher", teacher), ("baseline", baseline), ("distilled", student)):
        assert rows[label][:7] == [role["name"], f"{100 * role['top1']:.2f}%", f"{100 * role['top5']:.2f}%",
                                   f"{role['nll']:.3f}", f"{100 * role['ece']:.2f}%", f"{role['params'] / 1e6:.2f}M",
                                   f"{role['flops'] / 1e6:.1f}"], label
    assert f"gain over baseline: {100 * metrics['gain_over_baseline']:+.2f} points (T=3.0, alpha=0.9, kd)" \
        in proc.stdout
    assert "gain over baseline" in proc.stdout and "distilled" in proc.stdout

    # kdrun.log: every stage, every epoch, and the test accuracies metrics.json holds.
    log = (run_dir / "kdrun.log").read_text()
    assert "dataset synthetic: 320 train / 64 test, 10 classes, 3x16x16; device cpu" in log
    assert "teacher: training cifar:resnet14 for 4 epochs" in log
    assert "baseline: training cifar:resnet8 for 4 epochs" in log
    for stage in ("teacher", "baseline", "student"):
        assert [log.count(f"{stage} epoch {epoch}/4: ") for epoch in range(1, 5)] == [1, 1, 1, 1], stage
    assert f"teacher cifar:resnet14: test top-1 {100 * teacher['top1']:.2f}%" in log
    assert f"baseline cifar:resnet8: test top-1 {100 * baseline['top1']:.2f}%" in log
    for record in metrics["history"]:
        assert f"student epoch {record['epoch']}/4: loss {record['loss']:.4f}, " \
               f"train top-1 {100 * record['train_top1']:.2f}%, val top-1 {100 * record['val_top1']:.2f}%" in log

    # checkpoints/: the student after its last epoch, and at its best one (without optimizer state).
    last = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    best = torch.load(run_dir / "checkpoints" / "best.pt", weights_only=True)
    for saved in (last, best):
        assert saved["format"] == "kdrun-checkpoint" and saved["stage"] == "student"
        assert (saved["model_name"], saved["num_classes"], saved["in_chans"], saved["dataset"]) == (
            "cifar:resnet8", 10, 3, "synthetic")
        assert (saved["best_top1"], saved["best_epoch"]) == (student["best_top1"], student["best_epoch"])
        assert saved["history"] == metrics["history"][:saved["epoch"]]
        weights = saved["model"]
        assert set(weights) == set(last["model"]) and len(weights) > 10
        assert [w.shape[0] for w in weights.values() if w.ndim == 2] == [10]  # one classifier, 10 classes
        assert next(w for w in weights.values() if w.ndim == 4).shape[1] == 3  # the first convolution: RGB
        assert all(torch.isfinite(w).all() for w in weights.values() if w.is_floating_point())
    assert last["epoch"] == 4 and last["optimizer"] is not None
    assert best["epoch"] == student["best_epoch"] and best["optimizer"] is None
    assert best["history"][-1]["val_top1"] == student["best_top1"] == max(h["val_top1"] for h in metrics["history"])
    assert all(torch.equal(last["model"][k], w) for k, w in best["model"].items()) == (best["epoch"] == 4)

    # TensorBoard: one value per step (10 a epoch) for the loss terms, one per epoch for the accuracies,
    # the teacher's and baseline's real curves (their cached histories) and the fidelity metrics; the
    # last point of each per-epoch curve is the number of metrics.json.
    event_files = list(run_dir.glob("events.out.tfevents.*"))
    assert event_files
    events = EventAccumulator(str(run_dir)).Reload()
    for tag in ("train/loss", "train/loss_ce", "train/loss_kd", "train/lr"):
        assert [e.step for e in events.Scalars(tag)] == list(range(40)), tag
    cached = {role: torch.load(run_dir.parent / metrics[role]["path"], weights_only=True)["history"]  # cwd-relative
              for role in ("teacher", "baseline")}
    for tag, values in (("epoch/train_top1", [h["train_top1"] for h in metrics["history"]]),
                        ("epoch/val_top1", [h["val_top1"] for h in metrics["history"]]),
                        ("epoch/teacher_val_top1", [h["val_top1"] for h in cached["teacher"]]),
                        ("epoch/baseline_val_top1", [h["val_top1"] for h in cached["baseline"]])):
        scalars = events.Scalars(tag)
        assert [e.step for e in scalars] == [1, 2, 3, 4], tag
        assert [e.value for e in scalars] == pytest.approx(values), tag
    last = {tag: events.Scalars(tag)[-1].value for tag in ("epoch/val_top1", "epoch/gain_over_baseline",
                                                             "epoch/agreement", "epoch/ece", "epoch/kl_T")}
    assert last["epoch/val_top1"] == pytest.approx(student["top1"])
    assert last["epoch/gain_over_baseline"] == pytest.approx(metrics["gain_over_baseline"], abs=1e-6)
    assert last["epoch/agreement"] == pytest.approx(student["agreement"])
    assert last["epoch/ece"] == pytest.approx(student["ece"], rel=1e-5)
    assert last["epoch/kl_T"] == pytest.approx(student["kl_T"], rel=1e-4)
    assert not [tag for tag in events.Tags()["scalars"] if tag.startswith("final/")]  # no single-point charts


def test_metrics_json_has_documented_values(first_run, read_metrics):
    _, run_dir, _ = first_run
    metrics = read_metrics(run_dir)
    assert metrics["status"] == "completed"
    assert metrics["T"] == 3.0 and metrics["alpha"] == 0.9 and metrics["method"] == "kd"
    assert metrics["dataset"] == {"name": "synthetic", "num_classes": 10, "train_size": 320, "test_size": 64}
    for role in ("teacher", "baseline", "student"):
        for key in ("top1", "top5", "nll", "ece", "params", "flops", "latency_ms", "throughput", "latency_spread",
                    "throughput_spread", "timing_reliable"):
            assert key in metrics[role], (role, key)
        assert 0.0 <= metrics[role]["top1"] <= metrics[role]["top5"] <= 1.0
    assert metrics["gain_over_baseline"] == pytest.approx(metrics["student"]["top1"] - metrics["baseline"]["top1"])
    assert metrics["teacher"]["source"] == "trained" and metrics["baseline"]["source"] == "trained"
    assert len(metrics["history"]) == 4
    assert metrics["compression"] == pytest.approx(metrics["teacher"]["params"] / metrics["student"]["params"])
    assert metrics["retained"] == pytest.approx(metrics["student"]["top1"] / metrics["teacher"]["top1"])
    assert metrics["speedup"] == pytest.approx(metrics["teacher"]["latency_ms"] / metrics["student"]["latency_ms"])
    assert metrics["teacher"]["flops"] > metrics["student"]["flops"] > 0
    assert metrics["timing"]["threads"] == 1 and metrics["timing"]["device"] == "cpu"
    # baseline and distilled student share an architecture: one measurement, timed with the teacher
    assert [metrics["baseline"][k] for k in ("latency_ms", "throughput", "latency_spread")] == [
        metrics["student"][k] for k in ("latency_ms", "throughput", "latency_spread")]
    assert metrics["student"]["last_top1"] == metrics["history"][-1]["val_top1"]
    assert metrics["student"]["last_top1"] == pytest.approx(metrics["student"]["top1"])
    # The teacher learned the synthetic classes (a real training run, not a stub).
    assert metrics["teacher"]["top1"] > 0.5


def test_checkpoints_hold_the_student(first_run):
    _, run_dir, _ = first_run
    last = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert last["format"] == "kdrun-checkpoint" and last["model_name"] == "cifar:resnet8"
    assert last["epoch"] == 4 and last["num_classes"] == 10


def test_tensorboard_has_loss_terms_lr_and_accuracies(first_run, read_metrics):
    _, run_dir, _ = first_run
    events = EventAccumulator(str(run_dir)).Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/loss_ce", "train/loss_kd", "train/lr", "epoch/train_top1", "epoch/val_top1",
            "epoch/teacher_val_top1", "epoch/baseline_val_top1"} <= tags
    steps = [e.step for e in events.Scalars("train/loss")]
    assert steps == list(range(40))  # 320 images / batch 32 = 10 steps per epoch, 4 epochs
    metrics = read_metrics(run_dir)
    assert [e.value for e in events.Scalars("epoch/val_top1")] == pytest.approx(
        [h["val_top1"] for h in metrics["history"]])
    assert events.Scalars("epoch/teacher_val_top1")[-1].value == pytest.approx(metrics["teacher"]["top1"])


def test_second_run_with_other_t_reuses_teacher_and_baseline(first_run, tiny_args, run_kdrun, read_metrics):
    cwd, _, _ = first_run
    run_dir = cwd / "run2"
    proc = run_kdrun([*tiny_args, "T=8", f"hydra.run.dir={run_dir}"], cwd)
    assert proc.returncode == 0, proc.stderr
    assert "teacher: reusing cached" in proc.stderr and "baseline: reusing cached" in proc.stderr
    metrics = read_metrics(run_dir)
    assert metrics["teacher"]["source"] == "cache" and metrics["baseline"]["source"] == "cache"
    assert metrics["teacher"]["top1"] == read_metrics(cwd / "run1")["teacher"]["top1"]
    assert len(list((cwd / "outputs" / "cache" / "teacher").glob("*/model.pt"))) == 1


def test_killed_run_resumes_and_ends_like_an_uninterrupted_one(first_run, tiny_args, run_kdrun, read_metrics,
                                                               without_timings):
    """SIGKILL a real run after its first checkpoint; resume=true continues it to the same final metrics."""
    import os
    import re
    import signal
    import subprocess
    import sys
    import time

    cwd, _, _ = first_run
    args = [*tiny_args, "T=2", "student.epochs=6"]
    full = cwd / "full"
    assert run_kdrun([*args, f"hydra.run.dir={full}"], cwd).returncode == 0

    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "kdrun.cli", *args, "hydra.run.dir=outputs/runs/x/cut"],
                            cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    cut = cwd / "outputs" / "runs" / "x" / "cut"
    deadline = time.time() + 120
    while not (cut / "checkpoints" / "last.pt").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (cut / "metrics.json").exists(), "the run finished before it could be killed"

    # No process holds it any more: kdrun-report shows it interrupted, not running forever.
    from kdrun.sweeps.report import build_report

    assert [run.status for run in build_report(cwd / "outputs" / "runs").runs] == ["interrupted"]

    # resume=true from a new invocation finds the interrupted run by its overrides.
    resumed = run_kdrun([*args, "resume=true", "hydra.run.dir=outputs/runs/x/new"], cwd)
    assert resumed.returncode == 0, resumed.stderr
    assert f"continuing the interrupted run in {cut}" in resumed.stderr
    done = int(re.search(r"resuming from .* \(epoch (\d)/6 done\)", resumed.stderr).group(1))
    assert 1 <= done < 6
    # It continued in place: its own kdrun.log tells the whole story, and no second directory (husk) is left.
    assert not (cwd / "outputs" / "runs" / "x" / "new").exists()
    log = (cut / "kdrun.log").read_text()
    assert log.count("student epoch 1/6: ") == 1 and "continuing the interrupted run" in log
    assert "student epoch 6/6: " in log and log.index("student epoch 1/6: ") < log.index("resuming from")
    report = build_report(cwd / "outputs" / "runs")
    assert [run.status for run in report.runs] == ["completed"] and report.swept == []
    full_metrics, resumed_metrics = read_metrics(full), read_metrics(cut)
    assert resumed_metrics["history"][-1]["epoch"] == 6
    assert "resume=true" in resumed_metrics.pop("overrides") and "resume=true" not in full_metrics.pop("overrides")
    # The uninterrupted run trained the 6-epoch baseline, the resumed one found it in the cache.
    assert (full_metrics["baseline"].pop("source"), resumed_metrics["baseline"].pop("source")) == ("trained", "cache")
    # Everything but the clock: losses of every epoch, accuracies, NLL, ECE, agreement, KL, ...
    assert without_timings(resumed_metrics) == without_timings(full_metrics)


def test_a_first_run_says_where_things_went(kdrun, tiny_args, tmp_path):
    """The run directory, each stage as it starts, the cache entry built then reused, where the results are."""
    args = [a for a in tiny_args if not a.startswith("epochs=")] + ["epochs=1", "paradigm=baseline"]
    first, again = kdrun(*args, "hydra.run.dir=first"), kdrun(*args, "hydra.run.dir=again")
    assert first.returncode == 0 and again.returncode == 0, first.stderr + again.stderr
    (model,) = (tmp_path / "outputs" / "cache" / "baseline").glob("*/model.pt")
    entry = model.parent
    shown = str(entry.relative_to(tmp_path))
    assert "run directory: first" in first.stderr
    assert f"baseline: training cifar:resnet8 for 1 epoch; cached in {shown} for later runs" in first.stderr
    assert "1 epochs" not in first.stderr
    assert f"baseline: reusing cached cifar:resnet8 from {shown}" in again.stderr
    assert first.stderr.strip().splitlines()[-1].endswith(
        "wrote metrics.json, checkpoints/, kdrun.log and TensorBoard events to first")
    assert (tmp_path / "first" / "metrics.json").is_file()


def test_progress_bars_on_a_terminal_plain_lines_otherwise(first_run, tiny_args):
    """progress=auto draws tqdm bars when stderr is a terminal, and only log lines in a pipe."""
    import os
    import pty
    import subprocess
    import sys

    cwd, _, piped = first_run
    assert "batch/s" not in piped.stderr and "student epoch 1/4" in piped.stderr
    args = [a for a in tiny_args if not a.startswith("progress")]
    import fcntl
    import struct
    import termios

    leader, follower = pty.openpty()
    # A terminal 120 columns wide: a new pty has size 0x0, where tqdm draws nothing.
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    proc = subprocess.Popen([sys.executable, "-m", "kdrun.cli", *args, "T=5", "hydra.run.dir=tty_run"],
                            cwd=cwd, stdin=subprocess.DEVNULL, stdout=follower, stderr=follower,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    os.close(follower)
    output = b""
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # the terminal closes when the process exits
            break
        if not chunk:
            break
        output += chunk
    os.close(leader)
    assert proc.wait(timeout=300) == 0, output.decode(errors="replace")[-2000:]
    text = output.decode(errors="replace")
    assert "batch/s" in text or "s/batch" in text  # tqdm's per-batch bar
    assert "student 1/4" in text

"""End-to-end runs of the real `kdrun` command on tiny models and synthetic data."""
import pytest
import torch
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


def test_run_writes_every_output(first_run):
    _, run_dir, proc = first_run
    for path in (".hydra/config.yaml", ".hydra/overrides.yaml", "kdrun.log", "metrics.json",
                 "checkpoints/last.pt", "checkpoints/best.pt"):
        assert (run_dir / path).is_file(), path
    assert list(run_dir.glob("events.out.tfevents.*"))
    assert "gain over baseline" in proc.stdout and "distilled" in proc.stdout


def test_metrics_json_has_documented_values(first_run, read_metrics):
    _, run_dir, _ = first_run
    metrics = read_metrics(run_dir)
    assert metrics["status"] == "completed"
    assert metrics["T"] == 3.0 and metrics["alpha"] == 0.9 and metrics["method"] == "kd"
    assert metrics["dataset"] == {"name": "synthetic", "num_classes": 10, "train_size": 320, "test_size": 64}
    for role in ("teacher", "baseline", "student"):
        for key in ("top1", "top5", "nll", "ece", "params", "flops", "latency_ms", "throughput"):
            assert key in metrics[role], (role, key)
        assert 0.0 <= metrics[role]["top1"] <= metrics[role]["top5"] <= 1.0
    assert metrics["gain_over_baseline"] == pytest.approx(metrics["student"]["top1"] - metrics["baseline"]["top1"])
    assert metrics["teacher"]["source"] == "trained" and metrics["baseline"]["source"] == "trained"
    assert len(metrics["history"]) == 4
    assert metrics["compression"] == pytest.approx(metrics["teacher"]["params"] / metrics["student"]["params"])
    assert metrics["retained"] == pytest.approx(metrics["student"]["top1"] / metrics["teacher"]["top1"])
    assert metrics["speedup"] == pytest.approx(metrics["teacher"]["latency_ms"] / metrics["student"]["latency_ms"])
    assert metrics["teacher"]["flops"] > metrics["student"]["flops"] > 0
    assert metrics["timing"]["threads"] >= 1 and metrics["timing"]["device"] == "cpu"
    assert metrics["student"]["last_top1"] == metrics["history"][-1]["val_top1"]
    assert metrics["student"]["last_top1"] == pytest.approx(metrics["student"]["top1"])
    # The teacher learned the synthetic classes (a real training run, not a stub).
    assert metrics["teacher"]["top1"] > 0.5


def test_checkpoints_hold_the_student(first_run):
    _, run_dir, _ = first_run
    last = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=False)
    assert last["format"] == "kdrun-checkpoint" and last["model_name"] == "cifar:resnet8"
    assert last["epoch"] == 4 and last["num_classes"] == 10


def test_tensorboard_has_loss_terms_lr_and_accuracies(first_run, read_metrics):
    _, run_dir, _ = first_run
    events = EventAccumulator(str(run_dir)).Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/loss_ce", "train/loss_kd", "train/lr", "epoch/train_top1", "epoch/val_top1",
            "epoch/teacher_val_top1"} <= tags
    steps = [e.step for e in events.Scalars("train/loss")]
    assert steps == list(range(40))  # 320 images / batch 32 = 10 steps per epoch, 4 epochs
    metrics = read_metrics(run_dir)
    assert [e.value for e in events.Scalars("epoch/val_top1")] == pytest.approx(
        [h["val_top1"] for h in metrics["history"]])
    assert events.Scalars("epoch/teacher_val_top1")[0].value == pytest.approx(metrics["teacher"]["top1"])


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

    # resume=true from a new invocation finds the interrupted run by its overrides.
    resumed = run_kdrun([*args, "resume=true", "hydra.run.dir=outputs/runs/x/new"], cwd)
    assert resumed.returncode == 0, resumed.stderr
    assert f"continuing the interrupted run in {cut}" in resumed.stderr
    done = int(re.search(r"resuming from .* \(epoch (\d)/6 done\)", resumed.stderr).group(1))
    assert 1 <= done < 6
    full_metrics, resumed_metrics = read_metrics(full), read_metrics(cut)
    assert resumed_metrics["history"][-1]["epoch"] == 6
    assert "resume=true" in resumed_metrics.pop("overrides") and "resume=true" not in full_metrics.pop("overrides")
    # The uninterrupted run trained the 6-epoch baseline, the resumed one found it in the cache.
    assert (full_metrics["baseline"].pop("source"), resumed_metrics["baseline"].pop("source")) == ("trained", "cache")
    # Everything but the clock: losses of every epoch, accuracies, NLL, ECE, agreement, KL, ...
    assert without_timings(resumed_metrics) == without_timings(full_metrics)


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

"""Every method through the real `kdrun -m` command, once with a timm pair (here) and once with a torchvision
pair (test_methods_cli_torchvision.py: a file of its own, so that the suite's two workers run the two sweeps
side by side).

One sweep per pair keeps this cheap: the teacher is trained once and each method is one job of the sweep.
"""
import pytest
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from kdrun.paths import conf_dir, group_options

pytestmark = pytest.mark.slow

PAIRS = {
    "timm": ("resnet10t", "mobilenetv3_small_050"),
    "torchvision": ("torchvision:resnet18", "torchvision:mobilenet_v3_small"),
}
# The logit-standardization presets (kd_ls, dkd_ls, mlkd_ls) run the term classes of kd, dkd and mlkd with other
# values (test_response_losses composes and builds them): one job less each per pair keeps this test's time down.
# deit needs a student with a distillation token (a ViT): test_deit runs it, and the logit methods, on one.
METHODS = [name for name in group_options("distill") if not name.endswith("_ls") and name != "deit"]


def weighted_terms(method: str) -> set[str]:
    terms = yaml.safe_load((conf_dir() / "distill" / f"{method}.yaml").read_text())["terms"]
    return {name for name, spec in terms.items() if spec.get("weight", 1.0) != 0}


def run_sweep(pair: str, tmp_path_factory, run_kdrun, read_metrics) -> tuple[str, dict]:
    """Every method as one job of a `kdrun -m` sweep with the pair's teacher and student; (pair, method -> job dir)."""
    teacher, student = PAIRS[pair]
    cwd = tmp_path_factory.mktemp(f"methods_{pair}")
    proc = run_kdrun(["-m", f"distill={','.join(METHODS)}", f"teacher.name={teacher}", f"student.name={student}",
                      "dataset=synthetic", "dataset.image_size=32", "dataset.train_size=64", "dataset.test_size=32",
                      "epochs=1", "batch_size=32", "baseline=false", "progress=false", "tb_figures=0",
                      f"hydra.sweep.dir={cwd / 'sweep'}"], cwd, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = {}
    for job_dir in (cwd / "sweep").iterdir():
        if job_dir.is_dir() and (job_dir / "metrics.json").is_file():
            jobs[read_metrics(job_dir)["method"]] = job_dir
    return pair, jobs


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, run_kdrun, read_metrics):
    return run_sweep("timm", tmp_path_factory, run_kdrun, read_metrics)


@pytest.mark.parametrize("method", METHODS)
def test_method_runs_through_the_cli_and_logs_each_term(sweep, method, read_metrics):
    pair, jobs = sweep
    assert method in jobs, f"no finished job for {method} with the {pair} pair"
    metrics = read_metrics(jobs[method])
    assert metrics["status"] == "completed"
    # The student's test top-1 is the one trained model's: what the final evaluation measured equals what the
    # (single) epoch's validation measured, in metrics.json and in TensorBoard, as a count of the 32 test images.
    student = metrics["student"]
    assert metrics["dataset"]["test_size"] == 32 and len(metrics["history"]) == 1
    assert student["top1"] == pytest.approx(metrics["history"][-1]["val_top1"]), (method, pair)
    assert student["last_top1"] == student["best_top1"] == metrics["history"][-1]["val_top1"]
    assert 32 * student["top1"] == pytest.approx(round(32 * student["top1"]), abs=1e-6)
    assert student["top1"] <= student["top5"]
    events = EventAccumulator(str(jobs[method])).Reload()
    assert [e.value for e in events.Scalars("epoch/val_top1")] == pytest.approx([student["top1"]])
    tags = set(events.Tags()["scalars"])
    expected = {f"train/loss_{term}" for term in weighted_terms(method)}
    assert expected <= tags, f"{method} ({pair}) is missing {expected - tags}"

"""Divergence: a non-finite loss stops the stage at its step, before any checkpoint holds it."""
import csv
import math

import pytest
import torch

from kdrun.engine.divergence import LossWatch, Where, check_finite_weights
from kdrun.errors import DivergedError

NAMES = ["loss", "loss_ce", "loss_kd"]


def _watch(tmp_path, epoch=1, steps_per_epoch=10):
    return LossWatch(Where("student", epoch, 5, steps_per_epoch, tmp_path), NAMES, torch.device("cpu"))


def test_first_non_finite_step_stops_at_once_naming_the_terms(tmp_path):
    (tmp_path / "last.pt").write_bytes(b"epoch 1")
    watch = _watch(tmp_path)
    watch.add(torch.tensor([1.0, 0.5, 0.5]), 0.1)
    watch.add(torch.tensor([2.0, 1.0, 1.0]), 0.1)
    with pytest.raises(DivergedError) as raised:
        watch.add(torch.tensor([math.inf, 1.0, math.inf]), 0.2)
    error = raised.value
    # Epoch index 1 is the second epoch; its third step is step 10 + 3 = 13 of the stage.
    assert str(error).startswith("student diverged in epoch 2/5: loss=inf, loss_kd=inf at step 13; ")
    assert f"kept {tmp_path / 'last.pt'} (epoch 1)" in str(error) and "(it was 0.2)" in str(error)
    assert "\n" not in str(error)
    assert error.details == {"stage": "student", "epoch": 2, "step": 13, "terms": {"loss": "inf", "loss_kd": "inf"},
                             "lr": 0.2, "last_good_checkpoint": str(tmp_path / "last.pt"), "last_good_epoch": 1}


def test_finite_epoch_passes_and_values_come_back(tmp_path):
    watch = _watch(tmp_path)
    rows = [torch.tensor([1.0, 0.25, 0.75]), torch.tensor([0.5, 0.25, 0.25])]
    for row in rows:
        watch.add(row, 0.1)
    assert torch.equal(watch.values(), torch.stack(rows))


def test_epoch_end_check_catches_what_was_not_checked_per_step(tmp_path):
    """Devices checked once per epoch (mps, pending GPU copies) still stop before the checkpoint."""
    watch = LossWatch(Where("baseline", 0, 3, 4, tmp_path), NAMES, torch.device("meta"))
    watch.rows = [torch.tensor([1.0, 1.0, 0.0]), torch.tensor([math.nan, math.nan, 0.0])]
    watch.lrs = [0.1, 0.1]
    with pytest.raises(DivergedError, match=r"baseline diverged in epoch 1/3: loss=nan, loss_ce=nan at step 2; "
                                            r"no checkpoint was written yet"):
        watch.values()


def test_non_finite_weights_are_never_checkpointed(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    check_finite_weights(Where("teacher", 0, 1, 1, tmp_path), [model], 0.1)  # finite: no error
    model[1].running_var[0] = math.nan
    with pytest.raises(DivergedError, match=r"the weights became non-finite \('1.running_var'\) although every "
                                            r"loss was finite"):
        check_finite_weights(Where("teacher", 0, 1, 1, tmp_path), [model], 0.1)


@pytest.fixture
def teacher_file(tmp_path):
    from kdrun.models import create_model

    torch.manual_seed(0)
    path = tmp_path / "teacher.pt"
    torch.save(create_model("cifar:resnet14", num_classes=10, in_chans=3).state_dict(), path)
    return path


# The learning rate is multiplied by 1e8 after the first epoch: the second one blows up.
EXPLODING = ["baseline=false", "sched=multistep", "sched.milestones=[1]"]


@pytest.mark.slow
def test_diverged_run_stops_keeps_its_last_good_checkpoint_and_says_where(kdrun, tmp_path, teacher_file, tiny_args,
                                                                        read_metrics):
    proc = kdrun(*tiny_args, *EXPLODING, "student.epochs=3", "sched.gamma=1e8", f"teacher.checkpoint={teacher_file}", "hydra.run.dir=run")
    assert proc.returncode == 3, proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("kdrun: error:")]
    assert len(errors) == 1 and errors[0].startswith("kdrun: error: student diverged in epoch 2/3: loss=nan"), \
        proc.stderr
    metrics = read_metrics(tmp_path / "run")
    assert metrics["status"] == "diverged" and metrics["error"] == errors[0][len("kdrun: error: "):]
    where = metrics["diverged"]
    assert where["stage"] == "student" and where["epoch"] == 2 and where["last_good_epoch"] == 1
    assert 10 < where["step"] <= 20 and f"at step {where['step']};" in metrics["error"]  # 10 steps per epoch
    assert where["terms"]["loss"] == "nan" and where["lr"] == pytest.approx(0.05 * 1e8)
    checkpoints = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["best.pt", "last.pt"]
    for name in ("last.pt", "best.pt"):
        saved = torch.load(checkpoints / name, weights_only=True)
        assert saved["epoch"] == 1, name
        assert all(torch.isfinite(t).all() for t in saved["model"].values() if t.is_floating_point()), name
    assert where["last_good_checkpoint"] == str(checkpoints / "last.pt")


@pytest.mark.slow
def test_sweep_goes_on_after_a_diverged_job_and_names_it(kdrun, tmp_path, teacher_file, tiny_args, read_metrics):
    proc = kdrun("-m", *tiny_args, *EXPLODING, "student.epochs=2", "sched.gamma=1e8,0.5",
                 f"teacher.checkpoint={teacher_file}", "hydra.sweep.dir=sweep")
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    diverged, completed = (read_metrics(next((tmp_path / "sweep").glob(f"{n}_sched.gamma=*"))) for n in (0, 1))
    assert diverged["status"] == "diverged" and diverged["diverged"]["epoch"] == 2
    assert completed["status"] == "completed" and len(completed["history"]) == 2
    summary = proc.stderr.strip().splitlines()[-1]
    assert summary.startswith("kdrun: error: 1 sweep job(s) did not complete: 0_sched.gamma=100000000.0 diverged: "
                              "student diverged in epoch 2/2"), summary
    # The sweep report (written by the multirun callback) shows it too.
    with (tmp_path / "sweep" / "summary.csv").open() as table:
        statuses = {row["paths"]: row["status"] for row in csv.DictReader(table)}
    assert statuses == {"0_sched.gamma=100000000.0": "diverged", "1_sched.gamma=0.5": "completed"}

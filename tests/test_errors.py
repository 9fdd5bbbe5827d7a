"""Bad input: one line on stderr, a non-zero exit, no traceback, no half-written run directory."""
import pytest
import torch

from conftest import TINY

CASES = {
    "unknown teacher preset": (["teacher=resnet5O"], "unknown teacher model 'resnet5O'; did you mean 'resnet50'"),
    "unknown student name": (["student.name=mobilenetv3_lage_100"], "did you mean 'mobilenetv3_large_100'"),
    "unknown dataset": (["dataset=cifar11"], "unknown dataset 'cifar11'"),
    "unknown dataset name in config": (["dataset.name=cifar11"], "unknown dataset 'cifar11'"),
    "zero temperature": (["T=0"], "T=0.0 must be > 0"),
    "negative temperature": (["T=-2"], "T=-2.0 must be > 0"),
    "alpha above one": (["alpha=1.5"], "alpha=1.5 must be within [0, 1]"),
    "alpha below zero": (["alpha=-0.1"], "alpha=-0.1 must be within [0, 1]"),
    "zero epochs": (["epochs=0"], "epochs=0 must be >= 1"),
    "temperature not a number": (["T=hot"], "T=hot"),
    "unknown key": (["teacher.colour=red"], "teacher.colour"),
    "missing checkpoint": (["teacher.checkpoint=nowhere/t.pt"], "no such file"),
    "batch larger than the data": (["batch_size=1000"], "batch_size=1000 is larger than the training set"),
    "cifar10 files missing": (["dataset=cifar10", "dataset.root=no_data_here"], "dataset.download=true"),
    "pretrained weights offline": (["teacher.name=resnet18", "teacher.pretrained=true"], "teacher.checkpoint=PATH"),
    "device without a GPU": (["device=cuda:3"], "device=cuda:3") if not torch.cuda.is_available() else
    (["device=tpu"], "device=tpu"),
}


def assert_one_line_error(proc, expected: str, cwd):
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert "Traceback" not in proc.stderr
    error_lines = [line for line in lines if line.startswith("kdrun: error:")]
    assert len(error_lines) == 1, proc.stderr
    # Nothing else but kdrun's own timestamped log lines.
    assert all(line == error_lines[0] or line.startswith("[") for line in lines), proc.stderr
    assert expected in error_lines[0], error_lines[0]
    runs = cwd / "outputs" / "runs"
    assert not runs.exists() or not any(runs.glob("*/*/.hydra")), "a failed run left its directory behind"


@pytest.mark.parametrize("name", CASES)
def test_bad_input(name, kdrun, tmp_path):
    args, expected = CASES[name]
    base = TINY if not args[0].startswith("dataset=") else [a for a in TINY if not a.startswith("dataset")]
    assert_one_line_error(kdrun(*base, *args), expected, tmp_path)


def _save(obj, path):
    torch.save(obj, path)
    return path


def test_file_that_is_not_a_checkpoint(kdrun, tmp_path):
    bad = tmp_path / "notes.pt"
    bad.write_text("these are not weights")
    assert_one_line_error(kdrun(*TINY, f"teacher.checkpoint={bad}"), "is not a readable checkpoint", tmp_path)


def test_checkpoint_for_another_class_count(kdrun, tmp_path):
    from kdrun.models import create_model

    state = create_model("cifar:resnet14", num_classes=100, in_chans=3).state_dict()
    path = _save(state, tmp_path / "teacher100.pt")
    assert_one_line_error(kdrun(*TINY, f"teacher.checkpoint={path}"),
                          "has 100 output classes but the dataset has 10", tmp_path)


def test_checkpoint_of_another_architecture(kdrun, tmp_path):
    from kdrun.models import create_model

    path = _save(create_model("cifar:resnet8", num_classes=10, in_chans=3).state_dict(), tmp_path / "r8.pt")
    assert_one_line_error(kdrun(*TINY, f"teacher.checkpoint={path}"), "does not fit 'cifar:resnet14'", tmp_path)


def test_plain_state_dict_teacher_is_loaded_not_trained(kdrun, tmp_path):
    from kdrun.models import create_model

    torch.manual_seed(1)
    path = _save(create_model("cifar:resnet14", num_classes=10, in_chans=3).state_dict(), tmp_path / "t.pt")
    proc = kdrun(*TINY, f"teacher.checkpoint={path}", "baseline=false", "hydra.run.dir=run")
    assert proc.returncode == 0, proc.stderr
    assert "teacher: loaded cifar:resnet14" in proc.stderr and "teacher: training" not in proc.stderr
    import json
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["teacher"]["source"] == "checkpoint" and metrics["baseline"] is None

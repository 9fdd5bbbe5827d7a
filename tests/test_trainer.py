"""The training loop in-process: what trains, what stays frozen, and what the stage cache keys on."""
import copy
from pathlib import Path

import torch

from kdrun.data import build_dataset
from kdrun.distill import build_loss, hard_label_loss
from kdrun.engine.cache import stage_key
from kdrun.engine.forward import StepForward
from kdrun.engine.trainer import Recipe, Stage, train
from kdrun.models import create_model

SGD = {"name": "sgd", "momentum": 0.9, "nesterov": True, "weight_decay": 5e-4}


def tiny_data():
    return build_dataset({"name": "synthetic", "image_size": 16, "train_size": 320, "test_size": 64})


def stage(tmp_path: Path, epochs: int = 1) -> Stage:
    return Stage("student", Recipe(epochs, 0.05, 32, SGD, {"name": "cosine"}, 0), torch.device("cpu"),
                 tmp_path, {"model_name": "cifar:resnet8"})


def test_teacher_gets_no_gradient_and_student_learns(tmp_path):
    data = tiny_data()
    teacher = create_model("cifar:resnet8", 10, 3)
    student = create_model("cifar:resnet8", 10, 3)
    teacher_before = copy.deepcopy(teacher.state_dict())
    student_before = copy.deepcopy(student.state_dict())
    loss = build_loss({"terms": {"ce": {"type": "ce", "weight": 0.1}, "kd": {"type": "kd", "weight": 0.9, "T": 4}}})
    result = train(stage(tmp_path), StepForward(student, teacher), loss, data.train, data.test)
    for name, value in teacher.state_dict().items():
        assert torch.equal(value, teacher_before[name]), f"teacher {name} changed"  # BN stats included
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    changed = [n for n, v in student.state_dict().items() if not torch.equal(v, student_before[n])]
    assert len(changed) > len(student_before) // 2
    assert len(result.history) == 1 and {"loss", "loss_ce", "loss_kd"} <= set(result.history[0])


def test_training_improves_accuracy_on_learnable_data(tmp_path):
    data = tiny_data()
    torch.manual_seed(0)
    model = create_model("cifar:resnet8", 10, 3)
    result = train(stage(tmp_path, epochs=4), StepForward(model), hard_label_loss(), data.train, data.test)
    assert result.history[-1]["val_top1"] > 0.5  # chance is 0.1
    assert (tmp_path / "last.pt").is_file() and (tmp_path / "best.pt").is_file()
    assert result.best_top1 == max(h["val_top1"] for h in result.history)


def test_same_seed_same_result(tmp_path):
    data = tiny_data()
    runs = []
    for i in range(2):
        torch.manual_seed(0)
        model = create_model("cifar:resnet8", 10, 3)
        runs.append(train(stage(tmp_path / str(i)), StepForward(model), hard_label_loss(), data.train,
                          data.test).history[0])
    for key in ("loss", "train_top1", "val_top1"):
        assert runs[0][key] == runs[1][key]


def test_stage_key_depends_on_what_determines_the_stage():
    spec = {"stage": "teacher", "model": {"name": "resnet50"}, "dataset": {"name": "mnist5k"},
            "recipe": {"epochs": 3, "lr": 0.05, "seed": 0}}
    same = copy.deepcopy(spec)
    assert stage_key(spec) == stage_key(same)
    for path, value in ((("model", "name"), "resnet18"), (("dataset", "name"), "digits"),
                        (("recipe", "epochs"), 4), (("recipe", "seed"), 1)):
        other = copy.deepcopy(spec)
        other[path[0]][path[1]] = value
        assert stage_key(other) != stage_key(spec), path

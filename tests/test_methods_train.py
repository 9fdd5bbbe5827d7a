"""Every distillation method trains a real student from a real teacher through kdrun's distill stage."""
import pytest
import torch
from hydra import compose, initialize_config_dir

from kdrun.config.schema import register_configs
from kdrun.data import build_dataset
from kdrun.models import create_model
from kdrun.paths import conf_dir, group_options
from kdrun.stages.context import RunContext
from kdrun.stages.roles import distill_student

register_configs()
PAIRS = {
    "cifar": ("cifar:resnet14", "cifar:resnet8"),
    "timm_to_torchvision": ("resnet18", "torchvision:mobilenet_v3_small"),
}
# A method that needs a kind of student: deit reads a distillation token's head (a timm *_distilled_* ViT).
STUDENT_FOR = {"deit": "deit_tiny_distilled_patch16_224"}


def context(tmp_path, method: str, teacher: str, student: str) -> RunContext:
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[
            f"distill={method}", "dataset=synthetic", "dataset.image_size=16", "dataset.train_size=64",
            "dataset.test_size=32", f"teacher.name={teacher}", f"student.name={student}", "epochs=1",
            "batch_size=32", "progress=false", f"cache_dir={tmp_path / 'cache'}"])
    data = build_dataset(cfg.dataset)
    return RunContext(cfg, data, torch.device("cpu"), tmp_path, progress=False)


@pytest.mark.parametrize("method", group_options("distill"))
def test_method_trains_and_saves_its_learnable_parts(method, tmp_path):
    teacher_name, student_name = PAIRS["cifar"]
    ctx = context(tmp_path, method, teacher_name, STUDENT_FOR.get(method, student_name))
    teacher = create_model(teacher_name, 10, 3)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    outcome = distill_student(ctx, teacher, teacher_top1=0.5)
    history = outcome.result.history[0]
    assert torch.isfinite(torch.tensor(history["loss"]))
    assert all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items()), "teacher changed"
    last = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)
    assert last["loss"] is not None  # adapters, regressors, memory banks travel with the student
    if method == "crd":
        assert any("memory" in key for key in last["loss"])


@pytest.mark.parametrize("method", ["fitnets", "at", "reviewkd", "crd", "sp"])
def test_feature_methods_work_across_libraries(method, tmp_path):
    ctx = context(tmp_path, method, *PAIRS["timm_to_torchvision"])
    teacher = create_model(PAIRS["timm_to_torchvision"][0], 10, 3)
    outcome = distill_student(ctx, teacher, teacher_top1=0.5)
    assert torch.isfinite(torch.tensor(outcome.result.history[0]["loss"]))


# Automatic stage matching across architecture families, CNNs and a ViT; the ViT (made for 224 px) is
# rebuilt for the dataset's 32 px and its 1/16 token maps pair with the CNN's 1/16 stage.
MATCHED_PAIRS = [
    ("convnext_atto", "efficientnet_b0", [4, 8, 16, 32]),
    ("resnet18", "torchvision:mobilenet_v3_small", [2, 4, 8, 16, 32]),
    ("vit_tiny_patch16_224", "resnet10t", [16]),
    ("torchvision:resnet18", "cifar:resnet8", [2, 4]),
    ("cifar:resnet32x4", "cifar:shufflenetv2", [1, 2, 4]),
]


@pytest.mark.parametrize(("teacher_name", "student_name", "reductions"), MATCHED_PAIRS)
def test_stage_matching_pairs_equal_reductions_and_trains_adapters(teacher_name, student_name, reductions, tmp_path):
    from kdrun.distill import build_loss
    from kdrun.engine.forward import StepForward
    from kdrun.stages.roles import pair_features

    ctx = context(tmp_path, "fitnets", teacher_name, student_name)
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        ctx.cfg = compose(config_name="config", overrides=[
            "distill=fitnets", "+distill.terms.at={type: at, weight: 1000}", "dataset=synthetic",
            "dataset.image_size=32", f"teacher.name={teacher_name}", f"student.name={student_name}"])
    ctx.data = build_dataset(ctx.cfg.dataset)
    teacher, student = ctx.build_model("teacher").eval().requires_grad_(False), ctx.build_model("student")
    pairing = pair_features(ctx, student, teacher, ctx.cfg.distill)
    assert [pairing.student.reductions[i] for i in pairing.student_index] == reductions
    assert [pairing.teacher.reductions[i] for i in pairing.teacher_index] == reductions
    loss = build_loss(ctx.cfg.distill, pairing.shapes((3, 32, 32), 10, len(ctx.data.train)))
    images = torch.randn(4, 3, 32, 32)
    total, values = loss(StepForward(student, teacher, pairing)(images, torch.arange(4), torch.arange(4), 0))
    assert set(values) == {"ce", "fitnets", "at"} and torch.isfinite(total)
    total.backward()
    assert all(p.grad is not None for p in loss.parameters()), "an adapter got no gradient"
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    assert all(p.grad is None for p in teacher.parameters())

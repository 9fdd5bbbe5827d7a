"""Speed switches on the CPU: bf16 autocast trains, channels_last trains like fp32, fp16's GradScaler path
steps and resumes, impossible combinations are one-line errors."""
import copy
import math
import os
from pathlib import Path

import pytest
import torch
from torch import nn

from kdrun.data import build_dataset
from kdrun.distill import build_loss
from kdrun.engine.speed import Speed, build_speed, numerics_key
from kdrun.engine.forward import StepForward
from kdrun.engine.trainer import Recipe, Stage, train
from kdrun.errors import KdrunError
from kdrun.models import create_model

SGD = {"name": "sgd", "momentum": 0.9, "nesterov": True, "weight_decay": 5e-4}
KD = {"terms": {"ce": {"type": "ce", "weight": 0.1}, "kd": {"type": "kd", "weight": 0.9, "T": 4}}}


def tiny_data(train_size: int = 192):
    # bf16/fp16 convolutions are several times slower than fp32 on CPUs without bf16 instructions: keep them short
    return build_dataset({"name": "synthetic", "image_size": 16, "train_size": train_size, "test_size": 64})


def stage(tmp_path: Path, speed: Speed, epochs: int = 1) -> Stage:
    return Stage("student", Recipe(epochs, 0.05, 32, SGD, {"name": "cosine"}, 0), torch.device("cpu"),
                 tmp_path, {"model_name": "cifar:resnet8"}, speed=speed)


def distill(tmp_path: Path, speed: Speed, epochs: int = 1, train_size: int = 192):
    """A seeded KD run of resnet8 from a fixed resnet8 teacher; returns (history, student, teacher)."""
    data = tiny_data(train_size)
    torch.manual_seed(1)
    teacher = create_model("cifar:resnet8", 10, 3)
    torch.manual_seed(0)
    student = create_model("cifar:resnet8", 10, 3)
    result = train(stage(tmp_path, speed, epochs), StepForward(student, teacher), build_loss(KD), data.train, data.test)
    return result.history, student, teacher


def first_conv(model: nn.Module) -> nn.Conv2d:
    return next(m for m in model.modules() if isinstance(m, nn.Conv2d))


def test_bf16_trains_under_autocast_with_finite_metrics(tmp_path):
    dtypes = []
    data = tiny_data(train_size=96)
    torch.manual_seed(0)
    student, teacher = create_model("cifar:resnet8", 10, 3), create_model("cifar:resnet8", 10, 3)
    for model in (student, teacher):
        first_conv(model).register_forward_hook(lambda module, inputs, out: dtypes.append(out.dtype))
    before = copy.deepcopy(student.state_dict())
    result = train(stage(tmp_path, build_speed("bf16", False, False, torch.device("cpu"))),
                   StepForward(student, teacher), build_loss(KD), data.train, data.test)
    assert torch.bfloat16 in dtypes  # training passes (student and teacher) ran in bf16
    assert torch.float32 in dtypes   # evaluation stays fp32
    for record in result.history:
        for key in ("loss", "loss_ce", "loss_kd", "train_top1", "val_top1"):
            assert math.isfinite(record[key]), (key, record)
    assert all(v.dtype == before[k].dtype for k, v in student.state_dict().items())  # weights stay fp32
    assert any(not torch.equal(v, before[k]) for k, v in student.state_dict().items())


def test_channels_last_trains_like_fp32(tmp_path):
    plain, plain_student, _ = distill(tmp_path / "fp32", Speed())
    nhwc, nhwc_student, teacher = distill(tmp_path / "nhwc", Speed(channels_last=True))
    assert first_conv(nhwc_student).weight.is_contiguous(memory_format=torch.channels_last)
    assert first_conv(teacher).weight.is_contiguous(memory_format=torch.channels_last)
    for key in ("loss", "loss_ce", "loss_kd"):
        assert nhwc[0][key] == pytest.approx(plain[0][key], rel=1e-4, abs=1e-5), key
    assert nhwc[0]["val_top1"] == pytest.approx(plain[0]["val_top1"], abs=1 / 64 + 1e-9)
    for (name, a), b in zip(plain_student.state_dict().items(), nhwc_student.state_dict().values()):
        if a.is_floating_point():
            assert torch.allclose(a, b, rtol=1e-3, atol=1e-4), name


def test_fp16_grad_scaler_steps_and_its_state_resumes(tmp_path):
    """fp16 is refused on the CPU for users (slow, partial), but its GradScaler path runs here all the same."""
    speed = Speed("fp16", device_type="cpu")
    history, student, _ = distill(tmp_path, speed, train_size=64)
    assert math.isfinite(history[0]["loss"])
    saved = torch.load(tmp_path / "last.pt", weights_only=True)["scaler"]
    assert saved["scale"] > 0 and saved == speed.state_dict()
    resumed = Speed("fp16", device_type="cpu")
    resumed.load_state_dict(saved)
    assert resumed.state_dict() == saved


def test_impossible_combinations_are_one_line_errors():
    cpu = torch.device("cpu")
    with pytest.raises(KdrunError, match="precision=fp16 needs a CUDA GPU .*use precision=bf16 or precision=fp32"):
        build_speed("fp16", False, False, cpu)
    with pytest.raises(KdrunError, match="precision=fp8 is not one of fp32, bf16, fp16"):
        build_speed("fp8", False, False, cpu)
    assert build_speed("bf16", True, False, cpu).amp_dtype == torch.bfloat16
    assert build_speed("fp32", False, False, cpu).scaler is None


def test_cache_keys_change_only_for_other_numerics():
    assert numerics_key(Speed()) == {} and numerics_key(Speed(channels_last=True)) == {}
    assert numerics_key(Speed("bf16")) == {"precision": "bf16"}


@pytest.mark.slow
def test_cli_rejects_fp16_on_cpu_and_unknown_precision(tmp_path, run_kdrun):
    proc = run_kdrun(["dataset=synthetic", "device=cpu", "precision=fp16"], tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == ("kdrun: error: precision=fp16 needs a CUDA GPU (device is cpu): "
                                                    "use precision=bf16 or precision=fp32")
    proc = run_kdrun(["dataset=synthetic", "precision=half"], tmp_path)
    assert proc.returncode == 2 and "precision=half must be fp32, bf16 or fp16" in proc.stderr
    assert not (tmp_path / "outputs" / "runs").exists() or not any((tmp_path / "outputs" / "runs").rglob("*.pt"))


def test_linear_lr_scaling_follows_the_global_batch():
    from hydra import compose, initialize_config_dir

    from kdrun.config.schema import register_configs, stage_lr
    from kdrun.paths import conf_dir

    register_configs()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        none = compose(config_name="config", overrides=["lr=0.1", "batch_size=256"])
        linear = compose(config_name="config", overrides=["lr=0.1", "batch_size=256", "lr_scaling=linear",
                                                          "lr_base_batch=64", "teacher.lr=0.2"])
    assert stage_lr(none, "student") == pytest.approx(0.1)
    assert stage_lr(linear, "student") == pytest.approx(0.4)
    assert stage_lr(linear, "teacher") == pytest.approx(0.8)


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("KDRUN_TEST_COMPILE") != "1",
                    reason="torch.compile builds C++ kernels (minutes on 2 CPU cores): set KDRUN_TEST_COMPILE=1")
def test_compile_trains_like_eager(tmp_path):
    """torch.compile in place (inductor) gives the eager losses and keeps the state-dict keys."""
    eager, _, _ = distill(tmp_path / "eager", Speed())
    compiled, student, _ = distill(tmp_path / "compiled", Speed(compile=True))
    assert student._compiled_call_impl is not None  # compiled in place: state-dict keys unchanged
    assert list(student.state_dict()) == list(create_model("cifar:resnet8", 10, 3).state_dict())
    for key in ("loss", "loss_ce", "loss_kd"):
        assert compiled[0][key] == pytest.approx(eager[0][key], rel=1e-3), key

"""quantize=qat: quantization-aware distillation with torchao's PT2E flow (kdrun/deploy/qat.py,
kdrun/stages/qat.py): fake-quant state in the checkpoints, an exact resume, the int8 artifact in metrics.json."""
import copy

import pytest
import torch

from kdrun.data import build_dataset
from kdrun.deploy.qat import (
    FakeQuantized,
    convert_to_int8,
    fake_quant_keys,
    prepare_qat,
)
from kdrun.distill import build_loss
from kdrun.engine.checkpoint import load_file
from kdrun.engine.forward import StepForward
from kdrun.engine.trainer import Recipe, Stage, train
from kdrun.models import create_model

KD = {"terms": {"ce": {"type": "ce", "weight": 0.1}, "kd": {"type": "kd", "weight": 0.9, "T": 4}}}
ARTIFACT_KEYS = ("top1", "top5", "nll", "ece", "size_mb", "latency_ms", "throughput", "max_abs_logit_diff",
                 "agreement", "top1_drop", "speedup_vs_fp32", "params", "flops")


@pytest.fixture(scope="module")
def data():
    return build_dataset({"name": "synthetic", "image_size": 16, "train_size": 128, "test_size": 64})


@pytest.fixture(scope="module")
def prepared(data):
    """A trained-looking student (fixed seed) captured and fake-quantized once; tests deep-copy it."""
    torch.manual_seed(0)
    student = create_model("cifar:resnet8", 10, 3)
    return prepare_qat(student, torch.stack([data.test[i][0] for i in range(2)]), "cifar:resnet8")


def test_batchnorm_is_folded_and_every_conv_is_fake_quantized(prepared):
    ops = [str(n.target) for n in prepared.graph.nodes if n.op == "call_function"]
    assert not [op for op in ops if "batch_norm" in op]
    convs = sum("conv2d" in op for op in ops)
    assert convs == 9  # resnet8: stem + 3 stages x (2 + a shortcut in stages 2 and 3)
    keys = fake_quant_keys(prepared.state_dict())
    assert any(k.endswith(".scale") for k in keys) and any(k.endswith("min_val") for k in keys)
    # each conv's weight gets its own fake quantizer, per output channel once it has seen a batch
    assert len({k.split(".")[0] for k in keys}) > convs


def test_evaluation_leaves_the_quantization_ranges_alone(prepared, data):
    model = FakeQuantized(copy.deepcopy(prepared))
    images = torch.stack([data.train[i][0] for i in range(16)])
    model.train()
    model(images)  # observers take the batch
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.eval()
    with torch.no_grad():
        model(images * 3)  # a wider range than the observed one
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items() if "observer_enabled" not in k)
    model.train()
    model(images * 3)
    changed = [k for k in fake_quant_keys(model.state_dict()) if not torch.equal(before[k], model.state_dict()[k])]
    assert any(k.endswith("max_val") for k in changed)


def test_int8_graph_keeps_the_fake_quantized_predictions(prepared, data):
    model = FakeQuantized(copy.deepcopy(prepared))
    model.train()
    images = torch.stack([data.train[i][0] for i in range(32)])
    model(images)
    model.eval()
    with torch.no_grad():
        fake, int8 = model(images), convert_to_int8(model)(images)
    # the same rounding, computed once as fake quantization and once as reference int8 ops: one step of the
    # logits' quantization at most; and the predicted classes agree
    assert (fake - int8).abs().max() < 0.05 * fake.abs().max()
    assert (fake.argmax(1) == int8.argmax(1)).float().mean() >= 0.9


def qat_stage(path, epochs: int) -> Stage:
    return Stage("qat", Recipe(epochs, 0.01, 32, {"name": "sgd", "momentum": 0.9}, {"name": "cosine"}, 0),
                 torch.device("cpu"), path, {"model_name": "cifar:resnet8"})


class Killed(Exception):
    pass


def test_qat_checkpoint_holds_the_fake_quant_state_and_resumes_exactly(prepared, data, tmp_path):
    torch.manual_seed(1)
    teacher = create_model("cifar:resnet8", 10, 3).eval()

    def run(directory, stop_after=None):
        torch.manual_seed(0)
        model = FakeQuantized(copy.deepcopy(prepared))  # as a resumed run rebuilds it: prepared again, untrained
        stage = qat_stage(directory, epochs=3)
        if stop_after is not None:
            def kill(epoch, record):
                if epoch + 1 == stop_after:
                    raise Killed  # after the epoch's last.pt is written, as a SIGKILL then would leave it
            stage.on_epoch = kill
        result = train(stage, StepForward(model, teacher), build_loss(KD), data.train, data.test)
        return model, result

    straight, straight_result = run(tmp_path / "straight")
    with pytest.raises(Killed):
        run(tmp_path / "cut", stop_after=1)
    saved = load_file(tmp_path / "cut" / "last.pt")
    assert saved["epoch"] == 1
    keys = fake_quant_keys(saved["model"])
    assert keys and any(k.endswith("activation_post_process.max_val") for k in keys)
    assert all(saved["model"][k].numel() > 0 for k in keys if k.endswith("min_val"))  # observed, not empty
    resumed, resumed_result = run(tmp_path / "cut")
    assert [h["loss"] for h in resumed_result.history] == [h["loss"] for h in straight_result.history]
    for key, value in straight.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key


@pytest.fixture(scope="module")
def qat_run(tmp_path_factory, run_kdrun, tiny_args, read_metrics):
    cwd = tmp_path_factory.mktemp("qat")
    args = [a for a in tiny_args if not a.startswith("epochs=")]
    done = run_kdrun([*args, "teacher.epochs=1", "epochs=1", "baseline=false", "quantize=qat", "quantize.epochs=1",
                      "quantize.calibration=64", "hydra.run.dir=run"], cwd)
    assert done.returncode == 0, done.stderr[-3000:]
    return cwd / "run", read_metrics(cwd / "run"), done.stdout


def test_qat_run_ships_an_int8_student_beside_post_training_quantization(qat_run):
    run_dir, metrics, stdout = qat_run
    student, ptq, qat = metrics["student"], metrics["student_int8"], metrics["student_qat"]
    for artifact in (ptq, qat):
        for key in ARTIFACT_KEYS:
            assert isinstance(artifact[key], (int, float)), key
        assert artifact["top1_drop"] == pytest.approx(student["top1"] - artifact["top1"])
        assert artifact["speedup_vs_fp32"] == pytest.approx(student["latency_ms"] / artifact["latency_ms"])
        assert artifact["size_mb"] < 0.6 * student["size_mb"]  # int8 weights, plus the graph and scales
    report = metrics["export"]
    assert report["quantize"] == "qat" and report["formats"] == []
    info = report["qat"]
    assert info["epochs"] == 1 and info["lr"] == pytest.approx(0.05 * 0.01)  # lr times quantize.lr_scale
    assert [h["epoch"] for h in info["history"]] == [1]
    # the int8 file predicts what the fake-quantized model it came from predicted
    assert info["max_abs_diff_fake_quant"] < 0.5 and abs(info["fake_quant_top1"] - qat["top1"]) <= 2 / 64
    assert sorted(p.name for p in (run_dir / "export").iterdir()) == ["preprocessing.json", "student.int8.onnx",
                                                                      "student.qat.onnx"]
    saved = load_file(run_dir / "qat" / "checkpoints" / "last.pt")
    assert saved["stage"] == "qat" and saved["quantization"] == "qat" and saved["epoch"] == 1
    assert fake_quant_keys(saved["model"])
    rows = [line.split()[0] for line in stdout.splitlines() if line.startswith(("distilled", "int8", "qat"))]
    assert rows == ["distilled", "int8", "qat"]

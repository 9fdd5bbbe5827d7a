"""The shipped model: export (ONNX, torch.export program, TorchScript) with its preprocessing, int8
quantization by ONNX Runtime, each checked on the test split (kdrun/deploy/)."""
import json

import pytest
import torch
from torch import nn

from kdrun.data import build_dataset
from kdrun.deploy.export import FORMATS, export_model, export_program, write_preprocessing
from kdrun.deploy.onnx_runtime import OnnxRuntimeModel
from kdrun.deploy.quantize import CalibrationImages
from kdrun.errors import KdrunError
from kdrun.models import create_model

# fp32 ONNX Runtime against PyTorch: kernels differ (fused conv + BN, other summation orders), not precision.
ONNX_TOLERANCE = 1e-4
INT8_TOP1_MARGIN = 0.03   # int8 top-1 may fall this far below fp32 on digits (360 test images: 11 of them)


@pytest.mark.filterwarnings("ignore:`torch.jit")  # deprecated in recent torch; the files still load
@pytest.mark.parametrize("name, shape", [("test_efficientnet", (3, 32, 32)),      # timm
                                         ("tv:squeezenet1_1", (1, 32, 32))])     # torchvision
def test_export_round_trip_parity(name, shape, tmp_path):
    torch.manual_seed(0)
    model = create_model(name, num_classes=7, in_chans=shape[0]).eval()
    files = export_model(model, torch.randn(2, *shape), tmp_path, list(FORMATS), name)
    assert sorted(files) == sorted(FORMATS) and all(p.stat().st_size > 0 for p in files.values())
    images = torch.randn(5, *shape)  # another batch size than the traced one: the batch dimension is dynamic
    with torch.no_grad():
        expected = model(images)
        program = torch.export.load(str(files["program"])).module()(images)
        scripted = torch.jit.load(str(files["torchscript"]))(images)
    onnx = OnnxRuntimeModel(files["onnx"], threads=1)(images)
    assert onnx.shape == expected.shape == (5, 7)
    assert (onnx - expected).abs().max() < ONNX_TOLERANCE
    assert (program - expected).abs().max() < 1e-5
    assert (scripted - expected).abs().max() < 1e-5


class DataDependent(nn.Module):
    """A branch on the values of a tensor: torch.export cannot trace it into one graph."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 3)

    def forward(self, x):
        if x.sum() > 0:
            return self.linear(x)
        return -self.linear(x)


def test_data_dependent_control_flow_is_one_line():
    with pytest.raises(KdrunError) as raised:
        export_program(DataDependent(), torch.randn(2, 4), "brancher", "onnx")
    message = str(raised.value)
    assert "\n" not in message
    assert message.startswith("export=onnx: student brancher cannot be exported: it has data-dependent control flow")
    assert "export=none" in message


def test_preprocessing_sidecar_says_how_to_feed_the_model(tmp_path):
    data = build_dataset({"name": "digits"})
    path = write_preprocessing(tmp_path, data, "cifar:resnet8", {"onnx": tmp_path / "student.onnx"})
    sidecar = json.loads(path.read_text())
    assert sidecar["input"] == {"name": "images", "layout": "NCHW", "dtype": "float32", "channels": 1,
                                "height": data.image_size[0], "width": data.image_size[1]}
    assert sidecar["normalize"]["mean"] == list(data.mean) and sidecar["normalize"]["std"] == list(data.std)
    assert sidecar["output"]["class_names"] == data.class_names and sidecar["files"] == {"onnx": "student.onnx"}
    # the recipe reproduces the tensors the model was tested on
    image, _, position = data.test[0]
    pixels = data.test.images[position].float()
    mean = torch.tensor(sidecar["normalize"]["mean"]).view(-1, 1, 1)
    std = torch.tensor(sidecar["normalize"]["std"]).view(-1, 1, 1)
    assert torch.allclose((pixels * sidecar["normalize"]["pixel_scale"] - mean) / std, image, atol=1e-6)


def test_calibration_images_are_a_seeded_sample_of_the_training_split():
    data = build_dataset({"name": "digits"})
    first, again = CalibrationImages(data, 100, 32, seed=3), CalibrationImages(data, 100, 32, seed=3)
    batches = []
    while (feed := first.get_next()) is not None:
        batches.append(feed["images"])
    assert [len(b) for b in batches] == [32, 32, 32, 4]
    assert all((a == b).all() for a, b in zip(batches, [again.get_next()["images"] for _ in range(4)]))
    order = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(3))[:100]
    expected = torch.stack([data.train[int(i)][0] for i in order]).numpy()
    assert (torch.from_numpy(batches[0]) == torch.from_numpy(expected[:32])).all()
    first.rewind()
    assert (first.get_next()["images"] == batches[0]).all()


@pytest.fixture(scope="module")
def deployed(tmp_path_factory, run_kdrun, tiny_args, read_metrics):
    """A short distillation on digits, its student exported in every format and quantized to int8."""
    cwd = tmp_path_factory.mktemp("deploy")
    on_digits = [a for a in tiny_args if not a.startswith("dataset")] + ["dataset=digits"]
    done = run_kdrun([*on_digits, "teacher.epochs=1", "epochs=3", "batch_size=64", "baseline=false",
                      "export=[onnx,program,torchscript]", "quantize=int8", "quantize.calibration=256", "hydra.run.dir=run"], cwd)
    assert done.returncode == 0, done.stderr[-3000:]
    return cwd / "run", read_metrics(cwd / "run"), done.stdout


def test_exported_and_quantized_student_are_checked_on_the_test_split(deployed):
    run_dir, metrics, stdout = deployed
    student, onnx, int8 = metrics["student"], metrics["student_onnx"], metrics["student_int8"]
    for artifact in (onnx, int8):
        for key in ("top1", "top5", "nll", "ece", "size_mb", "latency_ms", "throughput", "max_abs_logit_diff",
                    "agreement", "top1_drop", "speedup_vs_fp32", "params", "flops"):
            assert isinstance(artifact[key], (int, float)), key
        assert artifact["params"] == student["params"] and artifact["flops"] == student["flops"]
        assert artifact["top1_drop"] == pytest.approx(student["top1"] - artifact["top1"])
        assert artifact["speedup_vs_fp32"] == pytest.approx(student["latency_ms"] / artifact["latency_ms"])
    assert onnx["max_abs_logit_diff"] < ONNX_TOLERANCE and onnx["agreement"] == 1.0
    assert onnx["top1"] == pytest.approx(student["top1"])
    assert student["top1"] > 0.5  # learnt something: the int8 margin below means something
    assert int8["top1"] >= student["top1"] - INT8_TOP1_MARGIN
    assert int8["size_mb"] < 0.5 * onnx["size_mb"]  # int8 weights: about a quarter, plus the graph
    assert student["size_mb"] == pytest.approx(onnx["size_mb"], rel=0.5)
    export = metrics["export"]
    assert export["formats"] == ["onnx", "program", "torchscript"] and export["quantize"] == "int8"
    assert export["int8"]["calibration_images"] == 256
    assert export["program"]["max_abs_logit_diff"] < 1e-5 and export["torchscript"]["max_abs_logit_diff"] < 1e-5
    assert sorted(p.name for p in (run_dir / "export").iterdir()) == sorted(
        ["preprocessing.json", "student.int8.onnx", *FORMATS.values()])
    rows = [line.split()[0] for line in stdout.splitlines() if line.startswith(("distilled", "onnx", "int8"))]
    assert rows == ["distilled", "onnx", "int8"]


def test_int8_alone_keeps_only_the_int8_file(run_kdrun, tiny_args, read_metrics, tmp_path):
    done = run_kdrun([*tiny_args, "epochs=1", "baseline=false", "quantize=int8", "quantize.calibration=32",
                      "hydra.run.dir=run"], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = read_metrics(tmp_path / "run")
    assert "student_onnx" not in metrics and "onnx" not in metrics["export"]
    assert sorted(p.name for p in (tmp_path / "run" / "export").iterdir()) == ["preprocessing.json",
                                                                               "student.int8.onnx"]
    sidecar = json.loads((tmp_path / "run" / "export" / "preprocessing.json").read_text())
    assert sidecar["files"] == {"int8": "student.int8.onnx"}

"""TensorBoard output written back and read with tensorboard's own readers: final scalars, HParams,
custom-scalars layout, soft-target figures and the reliability diagram; the printed summary."""
import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import metadata as hparams_metadata
from torch import nn

from kdrun.tensorboard.writer import final_scalars, open_writer, write_layout, write_run_summary


def model_metrics(top1, **extra):
    return {"name": "m", "top1": top1, "top5": 1.0, "nll": 0.5, "ece": 0.05, "params": 1000, "flops": 2000,
            "latency_ms": 2.0, "throughput": 500.0, **extra}


def sample_metrics(baseline=True):
    return {
        "status": "completed", "method": "kd", "T": 4.0, "alpha": 0.5, "seed": 1,
        "dataset": {"name": "synthetic", "num_classes": 3},
        "teacher": {**model_metrics(0.9), "name": "cifar:resnet14", "params": 2500, "latency_ms": 3.6},
        "baseline": {**model_metrics(0.8), "name": "cifar:resnet8"} if baseline else None,
        "student": {**model_metrics(0.85, agreement=0.95, kl_t1=0.1, kl_T=0.02, best_top1=0.875),
                    "name": "cifar:resnet8", "nll": 0.123, "ece": 0.045},
        "gain_over_baseline": 0.05 if baseline else None,
        "retained": 0.85 / 0.9, "compression": 2.5, "speedup": 1.8,
        "history": [{"epoch": 1}, {"epoch": 2}],
    }


def sample_cfg(tb_figures=0):
    return OmegaConf.create({"teacher": {"name": "cifar:resnet14"}, "student": {"name": "cifar:resnet8"},
                             "dataset": {"name": "synthetic", "image_size": 16}, "optim": {"name": "sgd"},
                             "T": 4.0, "alpha": 0.5, "epochs": 2, "lr": 0.05, "batch_size": 32, "seed": 1,
                             "baseline": False, "progress": "false", "tb_figures": tb_figures})


def test_final_scalars_name_every_metric_and_skip_absent_ones():
    scalars = final_scalars(sample_metrics())
    assert scalars["final/teacher/top1"] == pytest.approx(0.9)
    assert scalars["final/baseline/top1"] == pytest.approx(0.8)
    assert scalars["final/student/nll"] == pytest.approx(0.123)
    assert scalars["final/student/kl_T"] == pytest.approx(0.02)
    assert scalars["final/gain_over_baseline"] == pytest.approx(0.05)
    assert scalars["final/speedup"] == pytest.approx(1.8)
    for role in ("teacher", "baseline", "student"):
        for key in ("top1", "top5", "nll", "ece", "params", "flops", "latency_ms", "throughput"):
            assert f"final/{role}/{key}" in scalars
    for key in ("agreement", "kl_t1", "kl_T", "best_top1"):
        assert f"final/student/{key}" in scalars and f"final/teacher/{key}" not in scalars
    alone = final_scalars(sample_metrics(baseline=False))
    assert not [tag for tag in alone if "baseline" in tag]
    assert len(alone) == len(scalars) - 9  # 8 baseline metrics and the gain


def read_events(run_dir, **guidance):
    return EventAccumulator(str(run_dir), size_guidance={"images": 0, "scalars": 0, **guidance}).Reload()


def session_hparams(events) -> dict:
    content = events.PluginTagToContent("hparams")
    start = hparams_metadata.parse_session_start_info_plugin_data(content[hparams_metadata.SESSION_START_INFO_TAG])
    return {key: (value.string_value if value.HasField("string_value") else value.number_value)
            for key, value in start.hparams.items()}


def test_run_summary_writes_hparams_and_final_scalars_into_the_run_itself(tmp_path):
    (tmp_path / ".hydra").mkdir()  # as Hydra leaves it beside the run's files
    # The command line's overrides, as the runner records them in metrics.json.
    metrics = {**sample_metrics(), "overrides": ["T=4", "alpha=0.5", "dataset=synthetic", "dataset.image_size=16",
                                                 "optim=sgd", "teacher.name=cifar:resnet14", "baseline=false",
                                                 "progress=false"]}
    write_run_summary(tmp_path, sample_cfg(), metrics)

    assert [p for p in tmp_path.iterdir() if p.is_dir()] == [tmp_path / ".hydra"]  # no extra run
    events = read_events(tmp_path)
    assert session_hparams(events) == {
        "teacher": "cifar:resnet14", "student": "cifar:resnet8", "dataset": "synthetic", "method": "kd",
        "T": 4.0, "alpha": 0.5, "epochs": 2.0, "lr": 0.05, "batch_size": 32.0, "seed": 1.0,
        "dataset.image_size": 16.0, "optim": "sgd", "baseline": "false", "progress": "false"}
    experiment = hparams_metadata.parse_experiment_plugin_data(
        events.PluginTagToContent("hparams")[hparams_metadata.EXPERIMENT_TAG])
    metric_tags = {info.name.tag for info in experiment.metric_infos}
    assert {"final/student/top1", "final/teacher/top1", "final/baseline/top1", "final/gain_over_baseline",
            "final/student/agreement", "final/student/ece"} <= metric_tags
    scalars = set(events.Tags()["scalars"])
    assert metric_tags <= scalars  # every HParams metric has its value in the same run
    for tag, value in final_scalars(metrics).items():
        (point,) = events.Scalars(tag)
        assert point.value == pytest.approx(value) and point.step == 2
    assert events.Tags()["images"] == []  # tb_figures=0: no reliability diagram


def test_reliability_diagram_is_an_image_when_figures_are_on(tmp_path):
    logits = torch.randn(40, 3)
    labels = torch.randint(0, 3, (40,))
    write_run_summary(tmp_path, sample_cfg(tb_figures=2), sample_metrics(),
                      {"teacher": logits, "student": -logits}, labels)
    (image,) = read_events(tmp_path).Images("calibration/reliability")
    assert image.step == 2 and image.width > 400 and image.height > 200


def test_reliability_bins_reproduce_the_ece_of_metrics_json():
    from kdrun.evaluation.metrics import ECE_BINS, classification_metrics
    from kdrun.tensorboard.figures import reliability_bins

    # Confidences 0.9 (right), 0.9 (wrong), 0.6, 0.6 (both right): ECE = (2 * 0.4 + 2 * 0.4) / 4 = 0.4.
    probs = torch.tensor([[0.9, 0.1], [0.9, 0.1], [0.4, 0.6], [0.4, 0.6]])
    labels = torch.tensor([0, 1, 1, 1])
    bins = reliability_bins(probs.log(), labels, ECE_BINS)
    assert bins["count"].tolist() == [0] * 9 + [2] + [0] * 3 + [2] + [0]
    assert bins["accuracy"][13] == pytest.approx(0.5) and bins["confidence"][13] == pytest.approx(0.9)
    assert bins["accuracy"][9] == pytest.approx(1.0) and bins["confidence"][9] == pytest.approx(0.6)
    ece = (bins["count"] * abs(bins["accuracy"] - bins["confidence"])).sum() / bins["count"].sum()
    assert ece == pytest.approx(0.4)
    assert classification_metrics(probs.log(), labels)["ece"] == pytest.approx(0.4)

    logits, labels = torch.randn(500, 10) * 3, torch.randint(0, 10, (500,))
    bins = reliability_bins(logits, labels, ECE_BINS)
    ece = (bins["count"] * abs(bins["accuracy"] - bins["confidence"])).sum() / 500
    assert ece == pytest.approx(classification_metrics(logits, labels)["ece"], abs=1e-6)


def tiny_bundle():
    from kdrun.data import build_dataset

    return build_dataset({"name": "synthetic", "image_size": 8, "train_size": 30, "test_size": 12,
                          "num_classes": 3, "in_chans": 1})


def test_soft_target_figures_one_image_tag_per_picture_each_epoch(tmp_path):
    from kdrun.tensorboard.soft_targets import figure_positions, soft_target_logger

    assert figure_positions(12, 4) == [0, 3, 6, 9] and figure_positions(2, 4) == [0, 1]
    data = tiny_bundle()
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(64, 3)).eval()
    student = nn.Sequential(nn.Flatten(), nn.Linear(64, 3))
    writer = open_writer(tmp_path)
    write_layout(writer)
    assert soft_target_logger(writer, data, student, teacher, 4.0, 0, torch.device("cpu")) is None
    on_epoch = soft_target_logger(writer, data, student, teacher, 4.0, 3, torch.device("cpu"))
    on_epoch(0, {})
    with torch.no_grad():
        student[1].weight.mul_(-5)  # a different student must draw different bars
    on_epoch(1, {})
    assert student.training  # the figures leave the student in the mode they found it in
    writer.close()

    events = read_events(tmp_path)
    assert sorted(events.Tags()["images"]) == [f"soft_targets/image_{i}" for i in range(3)]
    for i in range(3):
        first, second = events.Images(f"soft_targets/image_{i}")
        assert (first.step, second.step) == (1, 2)
        assert first.width > 500 and first.height > 100
        assert first.encoded_image_string != second.encoded_image_string
    assert "custom_scalars__config__" in events.Tags()["tensors"]


def test_custom_scalars_layout_overlays_loss_terms_and_accuracies(tmp_path):
    from tensorboard.plugins.custom_scalar import layout_pb2, metadata
    from tensorboard.util import tensor_util

    writer = open_writer(tmp_path)
    write_layout(writer)
    writer.close()
    (point,) = read_events(tmp_path).Tensors(metadata.CONFIG_SUMMARY_TAG)
    layout = layout_pb2.Layout.FromString(tensor_util.make_ndarray(point.tensor_proto).item())
    charts = {chart.title: list(chart.multiline.tag) for category in layout.category for chart in category.chart}
    import re

    loss_tags = ["train/loss", "train/loss_ce", "train/loss_kd", "train/lr"]
    loss_regex = re.compile(charts["loss terms (per step)"][0])
    assert [tag for tag in loss_tags if loss_regex.search(tag)] == loss_tags[:3]
    accuracy_regex = re.compile(charts["student vs teacher top-1 (per epoch)"][0])
    assert all(accuracy_regex.search(tag) for tag in ("epoch/val_top1", "epoch/teacher_val_top1"))


@pytest.mark.slow
def test_no_figures_means_matplotlib_is_never_imported(tmp_path):
    code = (
        "import sys, torch; from pathlib import Path; from torch import nn\n"
        "from omegaconf import OmegaConf\n"
        "from test_tblog import sample_cfg, sample_metrics, tiny_bundle\n"
        "from kdrun.tensorboard.writer import open_writer, write_run_summary\n"
        "from kdrun.tensorboard.soft_targets import soft_target_logger\n"
        f"run = Path({str(tmp_path)!r})\n"
        "model = nn.Sequential(nn.Flatten(), nn.Linear(64, 3))\n"
        "assert soft_target_logger(open_writer(run), tiny_bundle(), model, model, 4.0, 0, torch.device('cpu')) is None\n"
        "write_run_summary(run, sample_cfg(0), sample_metrics(), {'student': torch.randn(4, 3)}, torch.zeros(4).long())\n"
        "print('matplotlib' in sys.modules)\n")
    tests_dir = str(__import__("pathlib").Path(__file__).parent)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**__import__("os").environ,
                               "PYTHONPATH": tests_dir + ":" + __import__("os").environ.get("PYTHONPATH", "")})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"


def test_printed_summary_has_nll_ece_and_the_fidelity_line():
    from kdrun.paradigms.offline import footer
    from kdrun.run.results import table

    def result_table(metrics: dict) -> str:  # what an offline run prints
        rows = [("teacher", metrics["teacher"]), ("baseline", metrics["baseline"]), ("distilled", metrics["student"])]
        return table(rows, footer(metrics))

    text = result_table(sample_metrics())
    header, teacher, baseline, student, gain, fidelity = text.splitlines()
    assert "NLL" in header and "ECE" in header
    assert header.index("NLL") < header.index("ECE") < header.index("params")
    assert "0.123" in student and "4.50%" in student and "5.00%" in teacher
    assert header.split()[-3:] == ["MFLOPs", "latency", "img/s"]
    assert teacher.split()[-3:] == ["0.0", "3.60ms", "500"]  # 2,000 FLOPs; latency at batch 1; throughput
    assert gain.startswith("gain over baseline: +5.00 points")
    assert fidelity == ("student vs teacher: agreement 95.00%, KL(T=1) 0.1000, KL(T=4) 0.0200, retained 94.4%, "
                        "compression 2.50x, speed-up 1.80x")
    no_baseline = result_table({**sample_metrics(baseline=False), "retained": None})
    assert "gain over baseline" not in no_baseline and "retained n/a" in no_baseline


def test_summary_rows_print_a_dash_for_what_a_model_lacks():
    from kdrun.evaluation.table import model_table

    combined = {k: v for k, v in model_metrics(0.5, name="mean of 2 teachers").items() if k != "latency_ms"}
    header, row = model_table([("teacher", combined), ("baseline", None)])
    assert row.split()[-3:] == ["0.0", "-", "500"] and len(header) == len(row)


def test_soft_target_panels_show_the_teachers_top_classes_at_t1_at_t_and_the_student():
    import math

    import numpy as np
    from matplotlib.colors import to_rgba

    from kdrun.tensorboard.figures import TOP_CLASSES, SoftTargetFigure

    teacher_logits = [0.3 * ((7 * c) % 12) for c in range(12)]   # 12 classes, a scrambled order
    student_logits = [0.1 * c for c in range(12)]
    T = 4.0

    def softmax(values, t):
        exps = [math.exp(v / t) for v in values]
        return torch.tensor([e / sum(exps) for e in exps])

    t1, soft, student = softmax(teacher_logits, 1.0), softmax(teacher_logits, T), softmax(student_logits, T)
    top = sorted(range(12), key=lambda c: -teacher_logits[c])[:TOP_CLASSES]
    label = top[2]
    figure = SoftTargetFigure(np.zeros((8, 8)), label, [f"class{c}" for c in range(12)], t1, soft, T)
    figure.render(student, epoch=3)
    _, t1_axes, soft_axes, student_axes = figure.canvas.figure.axes

    def heights(axes):
        return [bar.get_height() for bar in axes.patches]

    assert heights(t1_axes) == pytest.approx([float(t1[c]) for c in top])          # the teacher's top 10, largest first
    assert heights(soft_axes) == pytest.approx([float(soft[c]) for c in top])      # the same classes at T
    assert heights(student_axes) == pytest.approx([float(student[c]) for c in top])
    assert max(heights(soft_axes)) < max(heights(t1_axes))                         # softer at T > 1
    orange = to_rgba("tab:orange")
    assert [bar.get_facecolor() == orange for bar in t1_axes.patches] == [c == label for c in top]
    assert student_axes.get_title() == "student, T=4 (epoch 3)"

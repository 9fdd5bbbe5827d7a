"""TensorBoard output written back and read with tensorboard's own readers: HParams entries and config,
the sweep's run, custom-scalars layout, per-epoch curves, soft-target figures and reliability diagrams
(their size and fonts); the printed summary."""
import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import metadata as hparams_metadata
from torch import nn

from kdrun.tensorboard.writer import open_writer, write_layout, write_run_summary


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


def read_events(run_dir, **guidance):
    return EventAccumulator(str(run_dir), size_guidance={"images": 0, "scalars": 0, "tensors": 0,
                                                         **guidance}).Reload()


def session_hparams(events) -> dict:
    content = events.PluginTagToContent("hparams")
    start = hparams_metadata.parse_session_start_info_plugin_data(content[hparams_metadata.SESSION_START_INFO_TAG])
    return {key: (value.string_value if value.HasField("string_value") else value.number_value)
            for key, value in start.hparams.items()}


def experiment_of(events):
    return hparams_metadata.parse_experiment_plugin_data(
        events.PluginTagToContent("hparams")[hparams_metadata.EXPERIMENT_TAG])


RUN_OVERRIDES = ["T=4", "alpha=0.5", "dataset=synthetic", "dataset.image_size=16", "optim=sgd",
                 "teacher.name=cifar:resnet14", "baseline=false", "progress=false"]


def test_run_summary_writes_the_hparams_row_into_the_run_itself(tmp_path):
    run_dir = tmp_path / "7_T=4,alpha=0.5"
    (run_dir / ".hydra").mkdir(parents=True)  # as Hydra leaves it beside the run's files
    # The command line's overrides, as the runner records them in metrics.json.
    metrics = {**sample_metrics(), "overrides": RUN_OVERRIDES}
    write_run_summary(run_dir, sample_cfg(), metrics, sweep_job=7)

    assert [p for p in run_dir.iterdir() if p.is_dir()] == [run_dir / ".hydra"]  # no extra run
    events = read_events(run_dir)
    assert session_hparams(events) == {
        "job": "7_T=4,alpha=0.5", "teacher": "cifar:resnet14", "student": "cifar:resnet8", "dataset": "synthetic",
        "method": "kd", "T": 4.0, "alpha": 0.5, "epochs": 2.0, "lr": 0.05, "batch_size": 32.0, "seed": 1.0,
        "dataset.image_size": 16.0, "optim": "sgd", "baseline": "false", "progress": "false"}
    # a sweep's job leaves the config to the sweep's own run; and it writes no single-point scalars
    assert hparams_metadata.EXPERIMENT_TAG not in events.PluginTagToContent("hparams")
    assert events.Tags()["scalars"] == [] and events.Tags()["images"] == []  # tb_figures=0: no diagram


def test_a_single_run_leaves_the_hparams_config_to_tensorboard(tmp_path):
    """TensorBoard takes the first config of a logdir: one run's values must not filter the others' rows."""
    write_run_summary(tmp_path, sample_cfg(), {**sample_metrics(), "overrides": RUN_OVERRIDES})
    content = read_events(tmp_path).PluginTagToContent("hparams")
    assert hparams_metadata.SESSION_START_INFO_TAG in content and hparams_metadata.EXPERIMENT_TAG not in content


SWEEP_METRICS = [("epoch/val_top1", "student top-1"), ("epoch/gain_over_baseline", "gain over baseline"),
                 ("epoch/agreement", "agreement with teacher"), ("epoch/ece", "student ECE"),
                 ("epoch/kl_T", "KL(T) to teacher"), ("epoch/teacher_val_top1", "teacher top-1"),
                 ("epoch/baseline_val_top1", "baseline top-1")]


def test_sweep_run_orders_the_hparams_config_and_carries_the_report(tmp_path):
    from kdrun.tensorboard.sweep_run import SWEEP_RUN, write_sweep_run

    sessions = [{"job": f"{i}_T={T},alpha={alpha}", "teacher": "cifar:resnet14", "student": "cifar:resnet8",
                 "dataset": "digits", "method": "kd", "T": T, "alpha": alpha, "epochs": 3, "lr": 0.001,
                 "batch_size": 64, "seed": 0, "cache_dir": "outputs/cache"}
                for i, (T, alpha) in enumerate([(2.0, 0.5), (2.0, 0.9), (4.0, 0.5), (4.0, 0.9)])]
    plot = tmp_path / "student_top1_vs_T.png"
    from PIL import Image

    Image.new("RGB", (60, 40), (255, 0, 0)).save(plot)
    write_sweep_run(tmp_path, sessions[:1], ["T"], "old", [])  # a re-run sweep replaces the run
    run_dir = write_sweep_run(tmp_path, sessions, ["T", "alpha"], "| T | top-1 |\n|---|---|\n| 2 | 90.00 |", [plot])
    assert run_dir == tmp_path / SWEEP_RUN and len(list(run_dir.iterdir())) == 1
    events = read_events(run_dir, tensors=0)
    experiment = experiment_of(events)
    infos = {info.name: info for info in experiment.hparam_infos}
    assert list(infos) == ["T", "alpha", "teacher", "student", "method", "job", "dataset", "epochs", "lr",
                           "batch_size", "seed", "cache_dir"]
    assert [name for name, info in infos.items() if info.differs] == ["T", "alpha", "teacher", "student", "method"]
    # numbers: the interval they span (no value filter); strings: the values used
    assert (infos["T"].domain_interval.min_value, infos["T"].domain_interval.max_value) == (2.0, 4.0)
    assert (infos["alpha"].domain_interval.min_value, infos["alpha"].domain_interval.max_value) == (0.5, 0.9)
    assert [v.string_value for v in infos["job"].domain_discrete.values] == [s["job"] for s in sessions]
    assert [v.string_value for v in infos["teacher"].domain_discrete.values] == ["cifar:resnet14"]
    assert all(info.display_name == name for name, info in infos.items())
    assert [(m.name.tag, m.display_name) for m in experiment.metric_infos] == SWEEP_METRICS
    assert hparams_metadata.SESSION_START_INFO_TAG not in events.PluginTagToContent("hparams")  # no row of its own
    (text,) = events.Tensors("report/table/text_summary")
    assert text.tensor_proto.string_val[0].decode().startswith("| T | top-1 |")
    (image,) = events.Images("report/student_top1_vs_T")
    assert (image.width, image.height) == (60, 40)


def test_what_tensorboard_shows_first_is_what_the_sweep_varies(tmp_path):
    """TensorBoard 2.x lists the hparams marked `differs` first, sorted by name, and shows five; metrics in order."""
    from kdrun.tensorboard.hparams_config import hparam_order

    sessions = [{"job": "0", "seed": 0, "distill": "kd", "teacher": "a", "student": "b", "method": "kd", "lr": 0.1},
                {"job": "1", "seed": 1, "distill": "dkd", "teacher": "a", "student": "b", "method": "dkd", "lr": 0.1}]
    order, differs = hparam_order(sessions, ["distill", "seed"])
    assert order == ["method", "seed", "distill", "teacher", "student", "job", "lr"]
    assert differs == {"method", "seed", "distill", "teacher", "student"}


def test_reliability_diagrams_baseline_and_student_side_by_side_teacher_once(tmp_path):
    torch.manual_seed(0)
    logits = torch.randn(40, 3) * 3
    labels = torch.randint(0, 3, (40,))
    both = {"teacher": logits, "baseline": logits / 2, "student": -logits}
    write_run_summary(tmp_path / "job0", sample_cfg(tb_figures=2), sample_metrics(), both, labels, sweep_job=0)
    write_run_summary(tmp_path / "job1", sample_cfg(tb_figures=2), sample_metrics(), both, labels, sweep_job=1)
    first, second = read_events(tmp_path / "job0"), read_events(tmp_path / "job1")
    assert sorted(first.Tags()["images"]) == ["calibration/reliability", "calibration/teacher"]
    assert second.Tags()["images"] == ["calibration/reliability"]  # the teacher once per sweep
    (image,) = first.Images("calibration/reliability")
    # two columns, 5.3 x 4 inches at 110 dpi: about a TensorBoard card wide
    assert image.step == 2 and (image.width, image.height) == (583, 440)
    (teacher,) = first.Images("calibration/teacher")
    assert (teacher.width, teacher.height) == (302, 440)


def test_reliability_figure_has_one_column_per_model_with_bin_counts():
    from matplotlib.text import Text

    from kdrun.tensorboard.figures import reliability_bins, reliability_figure

    torch.manual_seed(0)
    logits, labels = torch.randn(200, 5) * 2, torch.randint(0, 5, (200,))
    figure = reliability_figure({"baseline": (logits, labels), "student": (logits / 3, labels)}, 15, "T=4, alpha=0.9")
    assert figure.get_suptitle() == "T=4, alpha=0.9" and figure.dpi == 110
    diagram, _, counts, _ = figure.axes  # row 1: the diagrams, row 2: their bin counts
    assert diagram.get_title().startswith("baseline: ECE ")
    assert [bar.get_height() for bar in counts.patches] == reliability_bins(logits, labels, 15)["count"].tolist()
    assert figure.axes[3].patches and sum(b.get_height() for b in figure.axes[3].patches) == 200
    sizes = {t.get_fontsize() for ax in figure.axes for t in ax.findobj(Text) if t.get_text()}
    assert min(sizes) >= 9 and max(sizes) <= 11


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
    write_layout(writer, ["ce", "kd"])
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


def test_custom_scalars_layout_one_chart_per_loss_term_top1_and_gain(tmp_path):
    import re

    from tensorboard.plugins.custom_scalar import layout_pb2, metadata
    from tensorboard.util import tensor_util

    writer = open_writer(tmp_path)
    write_layout(writer, ["ce", "kd"])
    writer.close()
    (point,) = read_events(tmp_path).Tensors(metadata.CONFIG_SUMMARY_TAG)
    layout = layout_pb2.Layout.FromString(tensor_util.make_ndarray(point.tensor_proto).item())
    charts = {category.title: {chart.title: list(chart.multiline.tag) for chart in category.chart}
              for category in layout.category}
    assert list(charts) == ["accuracy", "loss terms (per step)"]
    tags = ["train/loss", "train/loss_ce", "train/loss_kd", "train/lr", "epoch/val_top1", "epoch/train_top1",
            "epoch/baseline_val_top1", "epoch/teacher_val_top1", "epoch/gain_over_baseline", "epoch/agreement"]

    def shown(regexes):
        return [tag for tag in tags if any(re.search(regex, tag) for regex in regexes)]

    assert {title: shown(regexes) for title, regexes in charts["loss terms (per step)"].items()} == {
        "train/loss": ["train/loss"], "train/loss_ce": ["train/loss_ce"], "train/loss_kd": ["train/loss_kd"]}
    top1, gain = charts["accuracy"].values()
    assert shown(top1) == ["epoch/val_top1", "epoch/baseline_val_top1", "epoch/teacher_val_top1"]
    assert shown(gain) == ["epoch/gain_over_baseline"]


def test_per_epoch_curves_reference_models_and_fidelity(tmp_path):
    from kdrun.evaluation.metrics import classification_metrics, fidelity_metrics
    from kdrun.tensorboard.curves import val_curve, validation_logger, write_reference_curves

    assert val_curve([{"epoch": 1, "val_top1": 0.5}, {"epoch": 2, "val_top1": 0.75}]) == [0.5, 0.75]
    torch.manual_seed(0)
    teacher, labels = torch.randn(50, 4) * 2, torch.randint(0, 4, (50,))
    epochs = [torch.randn(50, 4), teacher + torch.randn(50, 4) * 0.3]
    writer = open_writer(tmp_path)
    write_reference_curves(writer, {"teacher": [0.4, 0.6, 0.7], "baseline": [0.3, 0.5]})
    on_validation = validation_logger(writer, teacher, 4.0, [0.3, 0.5])
    for epoch, logits in enumerate(epochs, 1):
        on_validation(epoch, logits, labels)
    on_validation(3, epochs[1], labels)  # past the baseline's last epoch: no gain
    writer.close()
    events = read_events(tmp_path)
    values = {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    assert values["epoch/teacher_val_top1"] == [(1, pytest.approx(0.4)), (2, pytest.approx(0.6)), (3, pytest.approx(0.7))]
    assert values["epoch/baseline_val_top1"] == [(1, pytest.approx(0.3)), (2, pytest.approx(0.5))]
    top1 = [(logits.argmax(1) == labels).float().mean().item() for logits in epochs]
    assert values["epoch/gain_over_baseline"] == [(1, pytest.approx(top1[0] - 0.3)), (2, pytest.approx(top1[1] - 0.5))]
    for epoch, logits in enumerate([*epochs, epochs[1]], 1):
        fidelity = fidelity_metrics(logits, teacher, 4.0)
        assert values["epoch/agreement"][epoch - 1] == (epoch, pytest.approx(fidelity["agreement"]))
        assert values["epoch/kl_T"][epoch - 1] == (epoch, pytest.approx(fidelity["kl_T"], rel=1e-5))
        assert values["epoch/ece"][epoch - 1] == (epoch, pytest.approx(classification_metrics(logits, labels)["ece"]))
    assert values["epoch/agreement"][1][1] > values["epoch/agreement"][0][1] + 0.3  # the second epoch follows the teacher


def test_cache_run_names_say_stage_model_dataset_and_key():
    from kdrun.tensorboard.writer import cache_run_name

    assert cache_run_name("teacher", "cifar:resnet14", "digits", "a3ea12b4c5d6e7f8") == "teacher-cifar_resnet14-digits-a3ea12"
    assert cache_run_name("baseline", "timm/mobilenetv3_small_050", "mnist5k", "0123456789abcdef") == (
        "baseline-timm_mobilenetv3_small_050-mnist5k-012345")


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


def test_soft_target_figure_is_sized_for_a_tensorboard_card():
    import numpy as np
    from matplotlib.text import Text

    from kdrun.tensorboard.figures import SoftTargetFigure

    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    torch.manual_seed(0)
    logits = torch.randn(10) * 3
    figure = SoftTargetFigure(np.ones((8, 8)) * 0.5, 3, names, logits.softmax(0), (logits / 4).softmax(0), 4.0, 0.9)
    pixels = figure.render((logits / 8).softmax(0), epoch=2)
    mpl_figure = figure.canvas.figure
    assert mpl_figure.dpi == 110 and pixels.shape == (473, 506, 3)  # 4.6 x 4.3 inches: about a card wide
    assert mpl_figure.get_suptitle() == "T=4, alpha=0.9"
    texts = [t for ax in mpl_figure.axes for t in ax.findobj(Text) if t.get_text()]
    assert {t.get_fontsize() for t in texts} <= {9.0, 10.0, 11.0}
    ticks = mpl_figure.axes[3].get_xticklabels()  # the panels share one row of class names, under the last
    assert [label.get_text() for label in ticks] == [names[c][:3] for c in figure.classes]
    assert all(label.get_rotation() == 0 and label.get_visible() for label in ticks)
    assert not any(label.get_visible() for ax in mpl_figure.axes[1:3] for label in ax.get_xticklabels())
    # tight margins: the drawing reaches within a few pixels of every edge
    drawn = np.argwhere((pixels < 250).any(2))
    (top, left), (bottom, right) = drawn.min(0), drawn.max(0)
    assert top < 10 and left < 10 and pixels.shape[0] - bottom < 10 and pixels.shape[1] - right < 10


def test_deployed_artifacts_are_scalars_for_the_hparams_tab_and_a_table(tmp_path):
    from kdrun.tensorboard.sweep_run import write_sweep_run
    from kdrun.tensorboard.writer import artifact_scalars

    metrics = {**sample_metrics(), "overrides": RUN_OVERRIDES}
    metrics["student"]["size_mb"] = 0.3
    metrics["student_int8"] = {**model_metrics(0.8125), "top1_drop": 0.85 - 0.8125, "size_mb": 0.09,
                               "latency_ms": 0.75}
    write_run_summary(tmp_path / "run", sample_cfg(), metrics, sweep_job=0)
    events = read_events(tmp_path / "run")
    scalars = {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    # at the distill stage's last epoch (2), beside the per-epoch curves' last points
    assert scalars == {"deploy/student_int8_top1": [(2, 0.8125)], "deploy/student_int8_size_mb": [(2, pytest.approx(0.09))],
                       "deploy/student_int8_latency_ms": [(2, 0.75)]}
    (text,) = events.Tensors("deploy/artifacts/text_summary")
    table = text.tensor_proto.string_val[0].decode().splitlines()
    assert table[2] == "| student_int8 | 81.25 | -3.75 | 0.09 | 0.30 | 0.75 | 2.00 |"
    # the sweep's HParams config lists them after the training metrics
    sweep = write_sweep_run(tmp_path, [{"job": "0", "T": 4.0}], ["T"], "",
                            [], [(tag, name) for tag, name, _ in artifact_scalars(metrics)])
    names = [(m.name.tag, m.display_name) for m in experiment_of(read_events(sweep)).metric_infos]
    assert names == SWEEP_METRICS + [("deploy/student_int8_top1", "int8 top-1"),
                                     ("deploy/student_int8_size_mb", "int8 size (MB)"),
                                     ("deploy/student_int8_latency_ms", "int8 latency (ms)")]

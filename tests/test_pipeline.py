"""The run pipeline's contract: a paradigm registers itself and returns its evaluated models; the
pipeline alone writes metrics.json (header, models, comparisons), the TensorBoard summary and the table."""
import json

import pytest
from hydra import compose, initialize_config_dir
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from kdrun.config.schema import register_configs
from kdrun.distill import build_loss
from kdrun.paradigms import PARADIGMS
from kdrun.paradigms.result import ParadigmResult, model_metrics, term_temperatures, predict_test_split
from kdrun.paths import conf_dir, group_options
from kdrun.run.pipeline import run_experiment
from kdrun.run.results import comparisons

register_configs()


def test_every_conf_paradigm_is_registered_and_every_registered_one_has_its_file():
    names = {}
    for option in group_options("paradigm"):
        with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
            names[option] = compose(config_name="config", overrides=[f"paradigm={option}"]).paradigm.name
    assert set(names.values()) == set(PARADIGMS.names())
    assert all(option == name for option, name in names.items())  # the file is named after its paradigm


def test_comparisons_against_hand_computed_values():
    student = {"top1": 0.6, "params": 1_000, "latency_ms": 2.0}
    teacher = {"top1": 0.8, "params": 4_000, "latency_ms": 5.0}
    baseline = {"top1": 0.5}
    assert comparisons(student, teacher, baseline) == pytest.approx(
        {"gain_over_baseline": 0.1, "retained": 0.75, "compression": 4.0, "speedup": 2.5})
    assert comparisons(student, None, None) == {"gain_over_baseline": None, "retained": None, "compression": None,
                                                "speedup": None}


def test_term_temperatures_are_what_each_term_holds():
    loss = build_loss({"terms": {"ce": {"type": "ce", "weight": 0.1}, "kd": {"type": "kd", "weight": 0.9, "T": 3},
                                 "mlkd": {"type": "mlkd", "weight": 1.0, "temperatures": [2, 5], "augment": False}}})
    assert term_temperatures(loss) == {"kd": 3.0, "mlkd": [2.0, 5.0]}  # ce has no temperature


def test_a_paradigm_registered_in_one_place_runs_through_the_pipeline(tmp_path):
    """A new paradigm is a registered function: the pipeline adds the header, comparisons, metrics.json,
    the TensorBoard summary and the table without any other file knowing about it."""
    calls = []

    @PARADIGMS.register("test_only_student")
    def run(ctx) -> ParadigmResult:
        model = ctx.build_model("student").to(ctx.device)
        logits, labels = predict_test_split(ctx, model)
        calls.append((ctx.run_dir, logits, labels))
        student = model_metrics(ctx, model, ctx.cfg.student.name, logits, labels, note="untrained")
        return ParadigmResult(models={"teacher": None, "baseline": None, "student": student},
                              rows=[("untrained", student)], history=[], temperatures={"none": 1.0},
                              footer=lambda metrics: f"footer sees {metrics['paradigm']}")

    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[
            "dataset=synthetic", "dataset.image_size=16", "dataset.train_size=64", "dataset.test_size=32",
            "student.name=cifar:resnet8", "teacher.name=cifar:resnet8", "progress=false", "tb_figures=0",
            "++paradigm.name=test_only_student", f"cache_dir={tmp_path / 'cache'}"])
    try:
        metrics = run_experiment(cfg, tmp_path / "run", ["T=4"])
    finally:
        PARADIGMS._entries.pop("test_only_student")  # leave the registry as the package made it
    [(run_dir, logits, labels)] = calls
    assert run_dir == tmp_path / "run"
    written = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert written == json.loads(json.dumps(metrics))
    assert written["paradigm"] == "test_only_student" and written["status"] == "completed"
    assert written["student"]["note"] == "untrained" and written["teacher"] is None
    assert written["gain_over_baseline"] is None and written["temperatures"] == {"none": 1.0}
    assert written["overrides"] == ["T=4"] and written["dataset"]["test_size"] == 32
    # the written top-1 is the accuracy of the paradigm's own test predictions
    assert written["student"]["top1"] == pytest.approx((logits.argmax(1) == labels).float().mean().item())
    hparams = EventAccumulator(str(tmp_path / "run")).Reload().PluginTagToContent("hparams")
    assert "_hparams_/session_start_info" in hparams  # its HParams row

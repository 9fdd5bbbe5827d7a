"""Timings a run reports: its models timed together, interleaved, with a median and a spread, flagged
when the spread is wide; one measurement per architecture; compiled modules timed uncompiled; and
compile=true's recompile allowance and one-line notice."""
import logging
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch._dynamo.testing import CompileCounter

from kdrun.engine.speed import Speed, build_speed
from kdrun.evaluation import cost, untimed
from kdrun.evaluation.cost import UNRELIABLE_SPREAD, combine_costs, spread, time_models
from kdrun.evaluation.table import model_table
from kdrun.paradigms.result import ParadigmResult, combined_cost, model_metrics, time_models_of

CPU = torch.device("cpu")
TIMING_KEYS = {"latency_ms", "latency_spread", "throughput", "throughput_spread", "timing_reliable"}


class Recorder(nn.Module):
    """Notes each call (its label and the thread count it ran with); optionally sleeps."""

    def __init__(self, label: str, calls: list, sleeps=()):
        super().__init__()
        self.label, self.calls, self.sleeps = label, calls, list(sleeps)
        self.linear = nn.Linear(4, 2)

    def forward(self, x):
        self.calls.append((self.label, x.shape[0], torch.get_num_threads(), self.training))
        if self.sleeps:
            time.sleep(self.sleeps[len(self.calls) % len(self.sleeps)])
        return self.linear(x)


def test_spread_is_the_interquartile_range_over_the_median():
    assert spread([10.0, 10.0, 10.0, 10.0, 10.0]) == 0.0
    # quartiles (inclusive) of 1..5 are 2 and 4, the median 3
    assert spread([1.0, 2.0, 3.0, 4.0, 5.0]) == pytest.approx(2 / 3)
    assert spread([5.0, 1.0, 4.0, 2.0, 3.0]) == pytest.approx(2 / 3)  # order does not matter
    assert spread([2.0]) == 0.0


def test_models_are_timed_in_alternation_with_the_same_threads_and_left_as_they_were():
    calls = []
    first, second = Recorder("a", calls), Recorder("b", calls).eval()
    figures = time_models({"a": first, "b": second}, (4,), 8, CPU, threads=1)
    assert torch.get_num_threads() >= 1 and first.training and not second.training  # modes restored
    assert {threads for _, _, threads, _ in calls} == {1}        # pinned the same way for both
    assert {training for *_, training in calls} == {False}       # timed in eval mode
    for size in (1, 8):  # latency at batch 1, then throughput at the batch size
        order = [label for label, batch, *_ in calls if batch == size]
        timed = order[2 * cost.WARMUP_RUNS:]  # after each model's warm-up
        assert cost.MIN_RUNS <= len(timed) // 2 <= cost.MAX_RUNS and len(timed) % 2 == 0
        rounds = [timed[i:i + 2] for i in range(0, len(timed), 2)]
        assert rounds == [["a", "b"] if k % 2 == 0 else ["b", "a"] for k in range(len(rounds))]  # interleaved
    for label in ("a", "b"):
        assert set(figures[label]) == TIMING_KEYS
        assert figures[label]["latency_ms"] > 0 and figures[label]["throughput"] > 0
        assert figures[label]["timing_reliable"] == (
            max(figures[label]["latency_spread"], figures[label]["throughput_spread"]) <= UNRELIABLE_SPREAD)


def test_a_figure_whose_runs_spread_widely_is_flagged_unreliable():
    calls = []
    # a call of 0 ms, then one of 20 ms, ...: the interquartile range is as large as the median
    figures = time_models({"jumpy": Recorder("jumpy", calls, sleeps=(0.0, 0.02))}, (4,), 2, CPU)["jumpy"]
    assert figures["latency_spread"] > UNRELIABLE_SPREAD and figures["timing_reliable"] is False


def test_a_compiled_module_is_timed_uncompiled():
    counter = CompileCounter()
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    model.compile(backend=counter)
    time_models({"compiled": model}, (4,), 16, CPU)
    assert counter.frame_count == 0  # no compilation at batch 1 nor at the batch size


def test_combined_figures_sum_the_members_and_keep_the_worst_spread():
    a = {"params": 10, "flops": 100, "latency_ms": 2.0, "latency_spread": 0.1, "throughput": 100.0,
         "throughput_spread": 0.05, "timing_reliable": True}
    b = {**a, "latency_ms": 3.0, "latency_spread": 0.4, "throughput": 50.0, "timing_reliable": False}
    both = combine_costs([a, b])
    assert both["params"] == 20 and both["flops"] == 200 and both["latency_ms"] == 5.0
    assert both["throughput"] == pytest.approx(1 / (1 / 100 + 1 / 50))
    assert both["latency_spread"] == 0.4 and both["timing_reliable"] is False
    assert set(combine_costs([{"params": 1, "flops": 2}])) == {"params", "flops"}  # members not timed yet


def fake_ctx(run_dir: Path) -> SimpleNamespace:
    """What measured_cost reads of a RunContext."""
    return SimpleNamespace(run_dir=run_dir, device=CPU, cfg=SimpleNamespace(batch_size=8),
                           data=SimpleNamespace(in_chans=3, image_size=(8, 8)))


def conv(width: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, width, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 2))


@pytest.fixture
def timed_calls(monkeypatch):
    """The model sets time_models was called with (labels are the architectures' keys)."""
    calls = []

    def record(models, *args, **kwargs):
        calls.append(dict(models))
        return {key: {"latency_ms": 1.0 + i, "latency_spread": 0.01, "throughput": 10.0 * (i + 1),
                      "throughput_spread": 0.01, "timing_reliable": True} for i, key in enumerate(models)}

    monkeypatch.setattr(untimed, "time_models", record)
    return calls


def metrics_of(ctx, model, name, **extra):
    logits, labels = torch.randn(6, 2), torch.tensor([0, 1, 0, 1, 0, 1])
    return model_metrics(ctx, model, name, logits, labels, **extra)


def time_result(**fields) -> None:
    """What the pipeline does with a paradigm's result: time its models together."""
    result = ParadigmResult(**fields)
    time_models_of(result.models, result.rows, result.extra)


def test_a_runs_models_are_timed_together_once_its_result_is_built(tmp_path, timed_calls):
    ctx = fake_ctx(tmp_path / "run")
    teacher, baseline, student = conv(16), conv(4), conv(4)
    teacher_m = metrics_of(ctx, teacher, "wide")
    baseline_m = metrics_of(ctx, baseline, "narrow")
    student_m = metrics_of(ctx, student, "narrow", agreement=0.5)
    ensemble_m = metrics_of(ctx, None, "both", cost=combined_cost([teacher_m, student_m]))
    # params and FLOPs at once; nothing timed while the paradigm still trains and evaluates
    assert teacher_m["params"] > student_m["params"] == baseline_m["params"] and student_m["flops"] > 0
    assert timed_calls == [] and "latency_ms" not in student_m and "latency_ms" not in ensemble_m

    time_result(models={"teacher": teacher_m, "baseline": baseline_m, "student": student_m,
                        "ensemble": ensemble_m}, rows=[], history=[])
    [models] = timed_calls  # one call: every model of the run, together
    assert len(models) == 2 and {id(m) for m in models.values()} == {id(teacher), id(baseline)}
    assert baseline_m["latency_ms"] == student_m["latency_ms"]  # one architecture, one measurement
    assert TIMING_KEYS <= set(teacher_m) and student_m["agreement"] == 0.5
    assert ensemble_m["latency_ms"] == teacher_m["latency_ms"] + student_m["latency_ms"]
    assert ensemble_m["params"] == teacher_m["params"] + student_m["params"]

    # a later model of the same architecture in the same run reuses the measurement
    again = metrics_of(ctx, conv(4), "narrow")
    assert again["latency_ms"] == student_m["latency_ms"] and len(timed_calls) == 1


def test_models_of_a_failed_run_are_not_timed_with_the_next_one(tmp_path, timed_calls):
    failed = metrics_of(fake_ctx(tmp_path / "failed"), conv(8), "left behind")  # its run raised before its result
    ctx = fake_ctx(tmp_path / "next")
    student = metrics_of(ctx, conv(4), "narrow")
    time_result(models={"student": student}, rows=[("distilled", student)], history=[])
    assert [list(models) for models in timed_calls] == [[(str(tmp_path / "next"), "narrow", student["params"])]]
    assert "latency_ms" in student and "latency_ms" not in failed
    time_result(models={}, rows=[], history=[])  # nothing waits any more
    assert len(timed_calls) == 1


def row_metrics(reliable: bool) -> dict:
    return {"name": "cifar:resnet8", "top1": 0.5, "top5": 0.9, "nll": 1.0, "ece": 0.1, "params": 1e6, "flops": 2e6,
            "latency_ms": 3.25, "throughput": 400.0, "timing_reliable": reliable}


def test_the_table_marks_unreliable_timings_and_says_why():
    header, steady, jumpy, legend = model_table([("teacher", row_metrics(True)), ("student", row_metrics(False))])
    assert steady.split()[-2:] == ["3.25ms", "400"]
    assert jumpy.split()[-2:] == ["~3.25ms", "~400"] and len(jumpy) == len(header)
    assert legend.startswith("~ timings spread over more than 25% of their median")
    assert len(model_table([("teacher", row_metrics(True))])) == 2  # no legend without a marked figure


def test_each_compiled_module_brings_dynamos_default_recompile_allowance():
    import torch._dynamo

    before = torch._dynamo.config.recompile_limit  # 8 x the modules compiled by earlier tests, or 8
    speed, models = Speed(compile=True), [nn.Linear(2, 2) for _ in range(20)]
    try:
        for model in models:
            speed.prepare(model)
        raised = torch._dynamo.config.recompile_limit
        for model in models:  # compiling a module again does not count twice
            speed.prepare(model)
        assert torch._dynamo.config.recompile_limit == raised >= max(20 * 8, before + 19 * 8)
    finally:
        torch._dynamo.config.recompile_limit = before


def test_dynamo_hitting_its_limit_is_said_once_in_one_line():
    build_speed("fp32", False, True, CPU)  # compile=true installs the notice
    dynamo_log, seen = logging.getLogger("torch._dynamo.convert_frame"), []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    dynamo_log.addHandler(handler)
    try:
        for _ in range(2):
            dynamo_log.warning("torch._dynamo hit config.%s (%s)\n   function: %s\n   last reason: %s\n"
                               'To log all recompilation reasons, use TORCH_LOGS="recompiles".\n'
                               "To diagnose recompilation issues, see %s", "recompile_limit", 8,
                               "'forward' (/x/cifar_common.py:105)", "0/7: grad_mode", "https://docs")
        dynamo_log.warning("another warning")
    finally:
        dynamo_log.removeHandler(handler)
    assert seen == ["compile=true: 'forward' (/x/cifar_common.py:105) was recompiled too often (torch._dynamo's "
                    "recompile limit); it runs uncompiled from here on", "another warning"]


def test_timing_budget_comes_from_the_environment(monkeypatch):
    from kdrun.errors import KdrunError

    monkeypatch.delenv(cost.BUDGET_VARIABLE, raising=False)
    assert cost.timing_budget() == cost.BUDGET_SECONDS == 1.0
    monkeypatch.setenv(cost.BUDGET_VARIABLE, "0.25")
    assert cost.timing_budget() == 0.25
    monkeypatch.setenv(cost.BUDGET_VARIABLE, "0")
    calls = []
    timed = cost._alternate({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, lambda: None)
    assert len(timed["a"]) == len(timed["b"]) == cost.MIN_RUNS   # no round beyond the minimum
    for bad in ("-1", "soon"):
        monkeypatch.setenv(cost.BUDGET_VARIABLE, bad)
        with pytest.raises(KdrunError, match=f"KDRUN_TIMING_BUDGET_S={bad} must be a number of seconds >= 0"):
            cost.timing_budget()

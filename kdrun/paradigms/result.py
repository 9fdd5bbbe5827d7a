"""What a paradigm returns to the run pipeline, and the evaluation of each model it trained.

A paradigm trains its models (kdrun.stages.roles) and evaluates each on the test split with
`model_metrics` (top-1/top-5/NLL/ECE, cost, plus what the paradigm adds: fidelity, best epoch, ...).
The pipeline (kdrun.run) adds the run's header and comparisons, writes metrics.json, the TensorBoard
summary and the printed table: no paradigm repeats that.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import nn

from kdrun.engine.evaluate import predict
from kdrun.engine.trainer import StageResult
from kdrun.evaluation.cost import combine_costs, count_flops, count_parameters
from kdrun.evaluation.metrics import classification_metrics
from kdrun.evaluation.untimed import Untimed
from kdrun.stages.context import RunContext
from kdrun.stages.roles import References, StageOutcome, obtain_baseline, obtain_teacher
from kdrun.tensorboard.curves import val_curve

log = logging.getLogger("kdrun")


@dataclass
class ParadigmResult:
    """The models of a run, evaluated, and how the table shows them."""
    models: dict[str, Any]      # metrics.json keys -> model metrics (or lists of them): teacher, baseline, student, ...
    rows: list[tuple[str, Optional[dict]]]   # the printed table: (label, model metrics); None rows are left out
    history: list[dict]         # per-epoch records of the final model's stage
    footer: Callable[[dict], str] = lambda metrics: ""   # lines under the table, from the finished metrics
    extra: dict = field(default_factory=dict)            # other metrics.json keys of this paradigm
    temperatures: dict = field(default_factory=dict)     # loss term -> the temperature(s) it used
    test_logits: dict[str, torch.Tensor] = field(default_factory=dict)   # for the reliability diagram
    labels: Optional[torch.Tensor] = None
    # The model a deployment ships (export=, quantize=): the metrics.json key it is reported under, and the model.
    deployable: Optional[tuple[str, nn.Module]] = None
    # quantize=qat: trains the fake-quantized student (kdrun.stages.qat); the deploy step calls it, so that a
    # failure there keeps the results of the stages before it
    qat: Optional[Callable[[], StageOutcome]] = None


def predict_test_split(ctx: RunContext, model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    return predict(model, ctx.data.test, ctx.cfg.batch_size, ctx.device)


def model_metrics(ctx: RunContext, model: nn.Module, name: str, logits: torch.Tensor, labels: torch.Tensor,
                  cost: Optional[dict] = None, **extra) -> dict:
    """top-1/top-5/NLL/ECE of `logits`, and the cost of `model`, as metrics.json holds them."""
    metrics = classification_metrics(logits, labels)
    metrics.update(name=name, **extra)
    cost = cost if cost is not None else measured_cost(ctx, model, name)
    metrics.update(cost)
    _untimed.follow(metrics, cost)  # latency and throughput come when the run's models are timed
    return metrics


@dataclass
class Evaluated:
    """A model of the run, its test-split logits and its metrics."""
    outcome: StageOutcome
    logits: torch.Tensor
    labels: torch.Tensor
    metrics: dict


def evaluate(ctx: RunContext, outcome: StageOutcome, name: str, **extra) -> Evaluated:
    logits, labels = predict_test_split(ctx, outcome.model)
    return Evaluated(outcome, logits, labels, model_metrics(ctx, outcome.model, name, logits, labels, **extra))


def evaluated_teacher(ctx: RunContext, **extra) -> Evaluated:
    """The run's teacher (checkpoint, stage cache or training), evaluated, with where it came from."""
    outcome = obtain_teacher(ctx)
    teacher = evaluate(ctx, outcome, ctx.cfg.teacher.name, **extra, source=outcome.source, path=outcome.path)
    log.info("teacher %s: test top-1 %.2f%%", ctx.cfg.teacher.name, 100 * teacher.metrics["top1"])
    return teacher


def evaluated_baseline(ctx: RunContext) -> Optional[dict]:
    """The baseline student's metrics (stage cache or training), or None with baseline=false."""
    baseline = baseline_evaluated(ctx)
    return baseline.metrics if baseline is not None else None


def baseline_evaluated(ctx: RunContext) -> Optional[Evaluated]:
    """The baseline student (stage cache or training) with its test logits and history; None with baseline=false."""
    if not ctx.cfg.baseline:
        return None
    outcome = obtain_baseline(ctx)
    baseline = evaluate(ctx, outcome, ctx.cfg.student.name, source=outcome.source, path=outcome.path)
    log.info("baseline %s: test top-1 %.2f%%", ctx.cfg.student.name, 100 * baseline.metrics["top1"])
    return baseline


def references(teacher: Optional[Evaluated], baseline: Optional[Evaluated],
               stored_logits: Optional[torch.Tensor] = None, stored_top1: Optional[float] = None) -> References:
    """What the distilled student's TensorBoard curves are drawn beside: the teacher's and the baseline's
    validation top-1 per epoch (their stages' histories), and the teacher's test logits. A teacher loaded
    from a checkpoint has no history: its test top-1 is drawn flat. `teacher=None`: stored teacher outputs
    (teacher.outputs), whose test logits and top-1 (where the file has them) stand in for the model's."""
    curves, flat = {}, {}
    for name, model in (("teacher", teacher), ("baseline", baseline)):
        if model is None:
            continue
        curve = val_curve(model.outcome.history)
        if curve:
            curves[name] = curve
        else:
            flat[name] = model.metrics["top1"]
    if teacher is None and stored_top1 is not None:
        flat["teacher"] = stored_top1
    return References(curves, flat, teacher.logits if teacher is not None else stored_logits)


_measured: dict[tuple, dict] = {}   # (run_dir, name, params) -> the cost of that architecture in that run
_untimed = Untimed()                # the run's models not timed yet, and the metrics their figures go into


def measured_cost(ctx: RunContext, model: nn.Module, name: str) -> dict:
    """params and FLOPs of `model` now; its latency and throughput once the run's models are timed
    together (`time_models_of`). Measured once per architecture in a run: the generations and peers
    of one architecture, or a baseline and its distilled student, cost the same."""
    key = (str(ctx.run_dir), name, count_parameters(model))
    if key not in _measured:
        _measured[key] = {"params": key[2], "flops": count_flops(model, input_shape_of(ctx), ctx.device)}
    return _timed_later(ctx, key, model)


def runtime_cost(ctx: RunContext, model: nn.Module, name: str, params: int, flops: int) -> dict:
    """The cost of a model another runtime runs (an exported or quantized file behind nn.Module's call): the
    params and FLOPs of the PyTorch model it came from; its speed measured with the run's models."""
    key = (str(ctx.run_dir), name, params)
    _measured.setdefault(key, {"params": params, "flops": flops})
    return _timed_later(ctx, key, model)


def input_shape_of(ctx: RunContext) -> tuple[int, ...]:
    return (ctx.data.in_chans, *ctx.data.image_size)


def _timed_later(ctx: RunContext, key: tuple, model: nn.Module) -> dict:
    cost = dict(_measured[key])
    if "latency_ms" not in cost:
        _untimed.add(key, model, (input_shape_of(ctx), ctx.cfg.batch_size, ctx.device), cost)
    return cost


def combined_cost(costs: list[dict]) -> dict:
    """The cost of running several models one after another (an ensemble, a group of teachers): the
    members' summed params, FLOPs and latency, their throughput together (filled in once they are timed)."""
    cost = combine_costs(costs)
    if "latency_ms" not in cost:
        _untimed.combine(costs, cost)
    return cost


def time_models_of(*results) -> None:
    """Time together the models whose metrics dicts are in `results` (dicts, lists, tuples, at any
    depth), and fill in their latency and throughput; forget any other model waiting (of a failed run)."""
    found: list[dict] = []

    def walk(value) -> None:
        if isinstance(value, dict):
            found.append(value)
            for item in value.values():
                walk(item)
        elif isinstance(value, (list, tuple)):
            for item in value:
                walk(item)

    walk(results)
    for key, figures in _untimed.settle(found).items():
        _measured[key].update(figures)


def training_summary(result: StageResult) -> dict:
    summary = {"best_top1": result.best_top1, "best_epoch": result.best_epoch, "last_top1": result.last_top1}
    if result.best_test_top1 is not None:   # dataset.val_split: the test accuracy of the epoch validation chose
        summary["best_test_top1"] = result.best_test_top1
    return summary


def term_temperatures(loss: nn.Module) -> dict:
    """Each loss term's temperature as the term holds it: `T`, or MLKD's list of `temperatures`."""
    found = {}
    for name, term in getattr(loss, "terms", {}).items():
        if hasattr(term, "temperatures"):
            found[name] = list(term.temperatures)
        elif isinstance(getattr(term, "T", None), (int, float)):
            found[name] = float(term.T)
    return found


def log_test_scalars(writer, values: dict[str, float], step: int = 0) -> None:
    """Test-split results as TensorBoard scalars (test/<name>), next to the training curves."""
    for name, value in values.items():
        writer.add_scalar(f"test/{name}", value, step)
    writer.flush()

"""paradigm=multi_teacher: one student, several teachers (`teachers=[resnet50,efficientnet_b0]`).

Each teacher is obtained exactly like an offline run's teacher (stage cache, or its own checkpoint), so
teachers trained by earlier runs are reused. The teachers form a kdrun.engine.group.ModelGroup; the
training loop hands every teacher's logits to the loss (kdrun.distill.multi_teacher), whose target is
their weighted soft distribution.
"""
from __future__ import annotations

import logging
from typing import Iterator

import torch

from kdrun.distill.multi_teacher import mixture_log_probs, multi_teacher_loss, teacher_weights
from kdrun.engine.forward import StepForward
from kdrun.engine.group import ModelGroup
from kdrun.evaluation.metrics import fidelity_metrics
from kdrun.paradigms.registry import PARADIGMS
from kdrun.paradigms.result import (ParadigmResult, combined_cost, evaluated_baseline, model_metrics,
                                    predict_test_split, term_temperatures, training_summary)
from kdrun.stages.context import RunContext, derive, model_config
from kdrun.stages.roles import Role, obtain_teacher, train_role
from kdrun.stages.steps import Step, baseline_step, teacher_step

log = logging.getLogger("kdrun")


def teacher_configs(ctx: RunContext) -> list[dict]:
    return [model_config(entry, "teacher") for entry in ctx.cfg.teachers]


def combined_test_logits(teacher_logits: list[torch.Tensor], labels: torch.Tensor, weighting: str, weights,
                         T: float) -> torch.Tensor:
    """The teachers' combined prediction on the test split as log-probabilities at temperature T.

    Confidence weights need each sample's label; on the test split that would grade the teachers with
    the answers, so the reported combination uses the plain mean there.
    """
    weighting = "mean" if weighting == "confidence" else weighting
    return mixture_log_probs(teacher_logits, teacher_weights(teacher_logits, labels, weighting, weights), T)


def multi_teacher_steps(ctx: RunContext) -> Iterator[Step]:
    configs = teacher_configs(ctx)
    teachers = [teacher_step(derive(ctx, teacher=config)) for config in configs]
    yield from teachers
    if ctx.cfg.baseline:
        yield baseline_step(ctx)
    settings = ctx.cfg.paradigm
    weights = list(settings.weights) if settings.get("weights") is not None else None

    def build():
        group = ModelGroup([teacher.model() for teacher in teachers])
        group.to(ctx.device).eval().requires_grad_(False)
        loss = multi_teacher_loss(ctx.cfg.alpha, ctx.cfg.T, settings.get("weighting", "mean"), weights)
        return StepForward(ctx.build_model("student"), group), loss
    yield Step(f"student {ctx.cfg.student.name}", "student", build, ctx.recipe("student"))


@PARADIGMS.register("multi_teacher", preflight=multi_teacher_steps)
def run(ctx: RunContext) -> ParadigmResult:
    cfg, settings = ctx.cfg, ctx.cfg.paradigm
    weighting = settings.get("weighting", "mean")
    weights = list(settings.weights) if settings.get("weights") is not None else None
    configs = teacher_configs(ctx)
    teachers, teacher_results, teacher_logits = [], [], []
    for config in configs:
        outcome = obtain_teacher(derive(ctx, teacher=config))
        logits, labels = predict_test_split(ctx, outcome.model)
        teacher_results.append(model_metrics(ctx, outcome.model, config["name"], logits, labels,
                                             source=outcome.source, path=outcome.path))
        teachers.append(outcome.model)
        teacher_logits.append(logits)
        log.info("teacher %s: test top-1 %.2f%%", config["name"], 100 * teacher_results[-1]["top1"])
    group = ModelGroup(teachers).to(ctx.device).eval().requires_grad_(False)
    combined = combined_test_logits(teacher_logits, labels, weighting, weights, 1.0)
    combined_name = "+".join(c["name"] for c in configs)
    teacher_metrics = model_metrics(ctx, group, combined_name, combined, labels, cost=combined_cost(teacher_results),
                                    weighting=weighting, weights=weights)

    baseline = evaluated_baseline(ctx)

    student = ctx.build_model("student").to(ctx.device)
    loss = multi_teacher_loss(cfg.alpha, cfg.T, weighting, weights)
    role = Role("student", StepForward(student, group), loss, ctx.meta("student"), ctx.recipe("student"),
                reference={"teacher": teacher_metrics["top1"]})
    result = train_role(ctx, role).result
    student_logits, _ = predict_test_split(ctx, student)
    fidelity = fidelity_metrics(student_logits, combined, 1.0)
    # KL at the run's T against the mixture at T: softmax(T * log p / T) = p.
    at_T = combined_test_logits(teacher_logits, labels, weighting, weights, cfg.T)
    fidelity["kl_T"] = fidelity_metrics(student_logits, cfg.T * at_T, cfg.T)["kl_T"]
    student_metrics = model_metrics(ctx, student, cfg.student.name, student_logits, labels, **fidelity,
                                    **training_summary(result))

    rows = [(f"teacher {k}", t) for k, t in enumerate(teacher_results)]
    rows += [("teachers", teacher_metrics), ("baseline", baseline), ("distilled", student_metrics)]
    return ParadigmResult(
        models={"teacher": teacher_metrics, "teachers": teacher_results, "baseline": baseline,
                "student": student_metrics},
        rows=rows, history=result.history, temperatures=term_temperatures(loss), deployable=("student", student),
        footer=lambda metrics: (f"gain over baseline: {100 * metrics['gain_over_baseline']:+.2f} points "
                                f"(T={cfg.T}, alpha={cfg.alpha}, {weighting} of {len(configs)} teachers)")
        if baseline else "")

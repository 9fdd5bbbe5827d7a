"""paradigm=assistant: teacher-assistant distillation (Mirzadeh et al., AAAI 2020).

teacher -> assistant -> student, two ordinary distill stages: the assistant (its own model config,
`assistant=NAME` / `assistant.name=NAME`) distils from the teacher into RUN_DIR/assistant/, then the
student distils from the assistant into RUN_DIR, both with the `distill` method.
"""
from __future__ import annotations

import logging
from typing import Iterator

from kdrun.evaluation.metrics import fidelity_metrics
from kdrun.models import check_model_name
from kdrun.paradigms.registry import PARADIGMS
from kdrun.paradigms.result import (ParadigmResult, baseline_evaluated, evaluated_teacher, model_metrics,
                                    predict_test_split, references, term_temperatures, training_summary)
from kdrun.stages.context import RunContext, derive, plain
from kdrun.stages.roles import References, distill_student
from kdrun.tensorboard.curves import val_curve
from kdrun.stages.steps import Step, baseline_step, distill_step, teacher_step

log = logging.getLogger("kdrun")


def assistant_steps(ctx: RunContext) -> Iterator[Step]:
    assistant = plain(ctx.cfg.assistant)
    teacher = teacher_step(ctx)
    yield teacher
    if ctx.cfg.baseline:
        yield baseline_step(ctx)
    middle = distill_step(derive(ctx, student=assistant), f"assistant {assistant['name']}", teacher.model, "assistant")
    yield middle
    yield distill_step(derive(ctx, teacher=assistant), f"student {ctx.cfg.student.name} (from the assistant)",
                       middle.model)


@PARADIGMS.register("assistant", preflight=assistant_steps)
def run(ctx: RunContext) -> ParadigmResult:
    cfg = ctx.cfg
    assistant_cfg = plain(cfg.assistant)
    check_model_name(assistant_cfg["name"], "assistant")

    teacher = evaluated_teacher(ctx)
    teacher_logits, labels, teacher_metrics = teacher.logits, teacher.labels, teacher.metrics
    baseline_model = baseline_evaluated(ctx)
    baseline = baseline_model.metrics if baseline_model is not None else None

    # The assistant takes the student's role (model and recipe) for its stage, in its own directory.
    assistant_ctx = derive(ctx, run_dir=ctx.run_dir / "assistant", student=assistant_cfg)
    log.info("assistant: %s distils from the teacher %s", assistant_cfg["name"], cfg.teacher.name)
    assistant = distill_student(assistant_ctx, teacher.outcome.model, references=references(teacher, None))
    assistant_logits, _ = predict_test_split(ctx, assistant.model)
    assistant_metrics = model_metrics(ctx, assistant.model, assistant_cfg["name"], assistant_logits, labels,
                                      **fidelity_metrics(assistant_logits, teacher_logits, cfg.T),
                                      **training_summary(assistant.result), path=assistant.path)

    # Then the assistant takes the teacher's role (feature taps are built for its name).
    student_ctx = derive(ctx, teacher=assistant_cfg)
    log.info("student: %s distils from the assistant %s", cfg.student.name, assistant_cfg["name"])
    # The student's curves beside its teacher's (the assistant's) and the baseline's.
    curves = {"teacher": val_curve(assistant.history)}
    if baseline_model is not None:
        curves["baseline"] = val_curve(baseline_model.outcome.history)
    student_references = References(curves, {}, assistant_logits)
    student = distill_student(student_ctx, assistant.model, references=student_references)
    student_logits, _ = predict_test_split(ctx, student.model)
    teacher_agreement = fidelity_metrics(student_logits, teacher_logits, cfg.T)["agreement"]
    student_metrics = model_metrics(ctx, student.model, cfg.student.name, student_logits, labels,
                                    **fidelity_metrics(student_logits, assistant_logits, cfg.T),
                                    teacher_agreement=teacher_agreement, **training_summary(student.result))

    rows = [("teacher", teacher_metrics), ("assistant", assistant_metrics), ("baseline", baseline),
            ("distilled", student_metrics)]
    return ParadigmResult(
        models={"teacher": teacher_metrics, "assistant": assistant_metrics, "baseline": baseline,
                "student": student_metrics},
        rows=rows, history=student.result.history, temperatures=term_temperatures(student.loss),
        deployable=("student", student.model),
        footer=lambda metrics: "" if baseline is None else (
            f"gain over baseline: {100 * metrics['gain_over_baseline']:+.2f} points "
            f"(T={cfg.T}, alpha={cfg.alpha}, {metrics['method']} through {assistant_cfg['name']})"))

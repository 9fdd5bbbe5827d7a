"""paradigm=offline (the default): teacher, then the baseline student on hard labels, then the student
distilled from the teacher (Hinton, Vinyals & Dean 2015, and every method in conf/distill/)."""
from __future__ import annotations

import logging
from typing import Iterator

from kdrun.evaluation.metrics import fidelity_metrics
from kdrun.paradigms.registry import PARADIGMS
from kdrun.paradigms.result import (ParadigmResult, baseline_evaluated, evaluated_teacher, model_metrics,
                                    predict_test_split, references, term_temperatures, training_summary)
from kdrun.stages.context import RunContext
from kdrun.stages.roles import distill_student
from kdrun.stages.steps import Step, baseline_step, distill_step, teacher_step

log = logging.getLogger("kdrun")


def offline_steps(ctx: RunContext) -> Iterator[Step]:
    """The teacher, the baseline and the distilled student (kdrun.run.preflight steps each once)."""
    teacher = teacher_step(ctx)
    yield teacher
    if ctx.cfg.baseline:
        yield baseline_step(ctx)
    yield distill_step(ctx, f"student {ctx.cfg.student.name}", teacher.model)


@PARADIGMS.register("offline", preflight=offline_steps)
def run(ctx: RunContext) -> ParadigmResult:
    cfg = ctx.cfg
    teacher = evaluated_teacher(ctx)
    teacher_logits, labels, teacher_metrics = teacher.logits, teacher.labels, teacher.metrics
    baseline = baseline_evaluated(ctx)
    baseline_metrics = baseline.metrics if baseline is not None else None
    student = distill_student(ctx, teacher.outcome.model, references=references(teacher, baseline))
    student_logits, _ = predict_test_split(ctx, student.model)
    student_metrics = model_metrics(ctx, student.model, cfg.student.name, student_logits, labels,
                                    **fidelity_metrics(student_logits, teacher_logits, cfg.T),
                                    **training_summary(student.result))
    return ParadigmResult(
        models={"teacher": teacher_metrics, "baseline": baseline_metrics, "student": student_metrics},
        rows=[("teacher", teacher_metrics), ("baseline", baseline_metrics), ("distilled", student_metrics)],
        history=student.result.history, footer=footer, temperatures=term_temperatures(student.loss),
        test_logits={"teacher": teacher_logits, **({"baseline": baseline.logits} if baseline is not None else {}),
                     "student": student_logits}, labels=labels)


def footer(metrics: dict) -> str:
    """The gain over the baseline, then how the student follows the teacher and what it saves."""
    lines = []
    if metrics["gain_over_baseline"] is not None:
        lines.append(f"gain over baseline: {100 * metrics['gain_over_baseline']:+.2f} points "
                     f"(T={metrics['T']}, alpha={metrics['alpha']}, {metrics['method']})")
    student, retained = metrics["student"], metrics["retained"]
    lines.append(f"student vs teacher: agreement {100 * student['agreement']:.2f}%, KL(T=1) {student['kl_t1']:.4f}, "
                 f"KL(T={metrics['T']:g}) {student['kl_T']:.4f}, "
                 f"retained {'n/a' if retained is None else f'{100 * retained:.1f}%'}, "
                 f"compression {metrics['compression']:.2f}x, speed-up {metrics['speedup']:.2f}x")
    return "\n".join(lines)

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
from kdrun.stages.qat import quantization_aware
from kdrun.stages.roles import distill_student
from kdrun.stages.stored_teacher import stored_teacher, stored_teacher_metrics
from kdrun.stages.steps import Step, baseline_step, distill_step, teacher_step

log = logging.getLogger("kdrun")


def offline_steps(ctx: RunContext) -> Iterator[Step]:
    """The teacher, the baseline and the distilled student (kdrun.run.preflight steps each once)."""
    teacher = None if ctx.cfg.teacher.outputs else teacher_step(ctx)  # a stored teacher is no model
    if teacher is not None:
        yield teacher
    if ctx.cfg.baseline:
        yield baseline_step(ctx)
    yield distill_step(ctx, f"student {ctx.cfg.student.name}", teacher.model if teacher is not None else None)


@PARADIGMS.register("offline", preflight=offline_steps)
def run(ctx: RunContext) -> ParadigmResult:
    cfg = ctx.cfg
    teacher = None
    if cfg.teacher.outputs:  # no model: metrics from the stored test outputs (README "Stored teacher outputs")
        stored = stored_teacher(cfg, ctx.data, ctx.device)
        teacher_metrics, labels = stored_teacher_metrics(stored, ctx.data)
        teacher_model, teacher_logits = None, stored.test_logits
        log.info("teacher %s: stored %s outputs%s", stored.name, stored.kind, "" if "top1" not in teacher_metrics
                 else f", test top-1 {100 * teacher_metrics['top1']:.2f}%")
    else:
        teacher = evaluated_teacher(ctx)
        teacher_model, teacher_logits, labels, teacher_metrics = (teacher.outcome.model, teacher.logits,
                                                                  teacher.labels, teacher.metrics)
    labels_only = teacher_metrics.get("outputs_kind") == "label"  # one-hot rows: no distribution to compare with
    baseline = baseline_evaluated(ctx)
    baseline_metrics = baseline.metrics if baseline is not None else None
    curves_beside = references(teacher, baseline, None if labels_only else teacher_logits, teacher_metrics.get("top1"))
    student = distill_student(ctx, teacher_model, references=curves_beside)
    student_logits, _ = predict_test_split(ctx, student.model)
    fidelity = {}
    if teacher_logits is not None:
        fidelity = fidelity_metrics(student_logits, teacher_logits, cfg.T)
        if labels_only:
            fidelity.update(kl_t1=None, kl_T=None)
    student_metrics = model_metrics(ctx, student.model, cfg.student.name, student_logits, labels, **fidelity,
                                    **training_summary(student.result))
    test_logits = {**({"teacher": teacher_logits} if teacher_logits is not None and not labels_only else {}),
                   **({"baseline": baseline.logits} if baseline is not None else {}), "student": student_logits}
    return ParadigmResult(
        models={"teacher": teacher_metrics, "baseline": baseline_metrics, "student": student_metrics},
        rows=[("teacher", teacher_metrics), ("baseline", baseline_metrics), ("distilled", student_metrics)],
        history=student.result.history, footer=footer, temperatures=term_temperatures(student.loss),
        test_logits=test_logits, labels=labels, deployable=("student", student.model),
        qat=(lambda: quantization_aware(ctx, teacher_model, student)) if cfg.quantize.name == "qat" else None)


def footer(metrics: dict) -> str:
    """The gain over the baseline, then how the student follows the teacher and what it saves."""
    lines = []
    if metrics["gain_over_baseline"] is not None:
        lines.append(f"gain over baseline: {100 * metrics['gain_over_baseline']:+.2f} points "
                     f"(T={metrics['T']}, alpha={metrics['alpha']}, {metrics['method']})")
    student = metrics["student"]
    lines.append(f"student vs teacher: agreement {shown(student.get('agreement'), '.2f', 100, '%')}, "
                 f"KL(T=1) {shown(student.get('kl_t1'), '.4f')}, "
                 f"KL(T={metrics['T']:g}) {shown(student.get('kl_T'), '.4f')}, "
                 f"retained {shown(metrics['retained'], '.1f', 100, '%')}, "
                 f"compression {shown(metrics['compression'], '.2f', unit='x')}, "
                 f"speed-up {shown(metrics['speedup'], '.2f', unit='x')}")
    return "\n".join(lines)


def shown(value, fmt: str, scale: float = 1.0, unit: str = "") -> str:
    """n/a for what a run lacks: a stored teacher has no size or speed, and a label-only one no distribution."""
    return "n/a" if value is None else format(scale * value, fmt) + unit

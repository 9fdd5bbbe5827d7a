"""paradigm=self: born-again networks (Furlanello, Lipton, Tschannen, Itti & Anandkumar, ICML 2018).

Generation 0 is the teacher (obtained as in an offline run: cache, checkpoint or training). Generation
k >= 1 is a new network of the teacher's architecture distilled from generation k-1, whose weights are
read back from its saved checkpoint. Each generation is an ordinary distill stage: generation k < N
writes into RUN_DIR/gen<k>/ (checkpoints/, TensorBoard), the last one into RUN_DIR itself.
"""
from __future__ import annotations

import logging
from typing import Iterator

from kdrun.engine.checkpoint import load_model_weights
from kdrun.engine.group import ModelGroup, ensemble_logits
from kdrun.evaluation.metrics import fidelity_metrics
from kdrun.paradigms.registry import PARADIGMS
from kdrun.paradigms.result import (ParadigmResult, combined_cost, evaluated_teacher, log_test_scalars, model_metrics,
                                    predict_test_split, term_temperatures, training_summary)
from kdrun.stages.context import RunContext, derive, plain
from kdrun.stages.roles import distill_student
from kdrun.stages.steps import Step, distill_step, teacher_step
from kdrun.tensorboard.writer import open_writer

log = logging.getLogger("kdrun")


def born_again_config(ctx: RunContext) -> dict:
    """The students' model config: the teacher's architecture, from scratch, with the student's recipe."""
    teacher, student = plain(ctx.cfg.teacher), plain(ctx.cfg.student)
    return {**teacher, "pretrained": False, "checkpoint": None, "epochs": student["epochs"], "lr": student["lr"]}


def generation_context(ctx: RunContext, k: int, generations: int) -> RunContext:
    run_dir = ctx.run_dir if k == generations else ctx.run_dir / f"gen{k}"
    return derive(ctx, run_dir=run_dir, student=born_again_config(ctx), seed=ctx.cfg.seed + k)


def load_generation(ctx: RunContext, k: int, generations: int):
    """Generation k's final weights, read from its checkpoints/last.pt as any checkpoint is (weights only)."""
    gen_ctx = generation_context(ctx, k, generations)
    model = gen_ctx.build_model("student")
    load_model_weights(model, gen_ctx.run_dir / "checkpoints" / "last.pt", f"generation {k}",
                       gen_ctx.cfg.student.name, ctx.data.num_classes)
    return model.to(ctx.device)


def self_steps(ctx: RunContext) -> Iterator[Step]:
    """Every generation has the teacher's architecture: generation 1 stands for all of them."""
    teacher = teacher_step(ctx)
    yield teacher
    generations = int(ctx.cfg.paradigm.get("generations", 2))
    yield distill_step(generation_context(ctx, 1, generations), f"generation 1 {ctx.cfg.teacher.name}",
                       teacher.model, "teacher")


@PARADIGMS.register("self", preflight=self_steps)
def run(ctx: RunContext) -> ParadigmResult:
    cfg = ctx.cfg
    generations = int(cfg.paradigm.get("generations", 2))
    teacher = evaluated_teacher(ctx, generation=0)
    teacher_logits, labels, teacher_metrics = teacher.logits, teacher.labels, teacher.metrics

    results, models, logits = [teacher_metrics], [], [teacher_logits]
    previous = teacher.outcome.model
    for k in range(1, generations + 1):
        gen_ctx = generation_context(ctx, k, generations)
        if k > 1:
            previous = load_generation(ctx, k - 1, generations)
        log.info("self: generation %d distils from generation %d", k, k - 1)
        outcome = distill_student(gen_ctx, previous, results[-1]["top1"])
        gen_logits, _ = predict_test_split(ctx, outcome.model)
        results.append(model_metrics(ctx, outcome.model, cfg.teacher.name, gen_logits, labels, generation=k,
                                     **fidelity_metrics(gen_logits, logits[-1], cfg.T),
                                     **training_summary(outcome.result), path=outcome.path))
        models.append(outcome.model)
        logits.append(gen_logits)
        log.info("self: generation %d test top-1 %.2f%%", k, 100 * results[-1]["top1"])

    ensemble = None
    if cfg.paradigm.get("ensemble", False):
        ensemble = model_metrics(ctx, ModelGroup(models), f"ensemble of generations 1-{generations}",
                                 ensemble_logits(logits[1:]), labels, cost=combined_cost(results[1:]))
    _log_generations(ctx, results, ensemble)

    student = results[-1]
    rows = [("teacher" if r["generation"] == 0 else f"gen {r['generation']}", r) for r in results]
    gain_over_teacher = student["top1"] - teacher_metrics["top1"]
    return ParadigmResult(
        models={"teacher": teacher_metrics, "baseline": None, "student": student, "generations": results,
                "ensemble": ensemble},
        rows=rows + [("ensemble", ensemble)], history=outcome.result.history,
        extra={"gain_over_teacher": gain_over_teacher}, temperatures=term_temperatures(outcome.loss),
        deployable=("student", models[-1]),
        footer=lambda metrics: (f"gain over the teacher: {100 * gain_over_teacher:+.2f} points after {generations} "
                                f"generation(s) (T={cfg.T}, alpha={cfg.alpha}, {metrics['method']})"))


def _log_generations(ctx: RunContext, results: list[dict], ensemble) -> None:
    """Per-generation accuracy as TensorBoard scalars over the generation index (0 = teacher)."""
    writer = open_writer(ctx.run_dir)
    try:
        for r in results:
            writer.add_scalar("generation/test_top1", r["top1"], r["generation"])
            if "best_top1" in r:
                writer.add_scalar("generation/best_val_top1", r["best_top1"], r["generation"])
        if ensemble is not None:
            log_test_scalars(writer, {"ensemble_top1": ensemble["top1"]})
        writer.flush()
    finally:
        writer.close()

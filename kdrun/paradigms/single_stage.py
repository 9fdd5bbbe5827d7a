"""paradigm=teacher and paradigm=baseline: one stage of an offline run on its own.

The model is trained (or loaded) through the stage cache exactly as an offline run would, so a later
offline run with the same model, dataset, recipe and seed reuses it; the run directory gets the usual
outputs too: metrics.json, checkpoints/{last,best}.pt and the training curves in TensorBoard.
"""
from __future__ import annotations

import logging
from pathlib import Path

from kdrun.engine.checkpoint import copy_atomic, read_checkpoint, save_model
from kdrun.engine.teacher_file import EXPORT_FILE, export_teacher
from kdrun.paradigms.registry import PARADIGMS
from kdrun.paradigms.result import ParadigmResult, log_test_scalars, model_metrics, predict_test_split
from kdrun.stages.context import RunContext
from kdrun.stages.roles import StageOutcome, obtain_baseline, obtain_teacher
from kdrun.stages.steps import baseline_step, teacher_step
from kdrun.tensorboard.writer import open_writer

log = logging.getLogger("kdrun")


@PARADIGMS.register("teacher", preflight=lambda ctx: iter([teacher_step(ctx)]))
def run_teacher(ctx: RunContext) -> ParadigmResult:
    outcome = obtain_teacher(ctx)
    result = _one_stage(ctx, outcome, role="teacher", key="teacher")
    if ctx.cfg.teacher.export_outputs:  # README "Stored teacher outputs"
        teacher = ctx.cfg.teacher
        path = export_teacher(outcome.model, ctx.data, ctx.run_dir / EXPORT_FILE, teacher.export_kind,
                              teacher.export_k, teacher.name, ctx.cfg.batch_size, ctx.device)
        log.info("teacher outputs (%s) of the training and test splits written to %s", teacher.export_kind, path)
        result.extra["teacher_outputs"] = {"path": str(path), "kind": teacher.export_kind,
                                           "k": int(teacher.export_k) if teacher.export_kind == "topk" else None}
    return result


@PARADIGMS.register("baseline", preflight=lambda ctx: iter([baseline_step(ctx)]))
def run_baseline(ctx: RunContext) -> ParadigmResult:
    return _one_stage(ctx, obtain_baseline(ctx), role="student", key="baseline")


def _one_stage(ctx: RunContext, outcome: StageOutcome, role: str, key: str) -> ParadigmResult:
    logits, labels = predict_test_split(ctx, outcome.model)
    metrics_of_model = model_metrics(ctx, outcome.model, ctx.cfg[role].name, logits, labels,
                                     source=outcome.source, path=outcome.path)
    history = stage_history(outcome)
    export(ctx, outcome, role, key, history, metrics_of_model)
    checkpoint = str(ctx.run_dir / "checkpoints" / "last.pt")
    return ParadigmResult(models={"teacher": None, "baseline": None, "student": None, key: metrics_of_model},
                          rows=[(key, metrics_of_model)], history=history, extra={"checkpoint": checkpoint},
                          footer=lambda metrics: f"saved {key} to {checkpoint} (and the stage cache)",
                          deployable=(key, outcome.model))


def stage_history(outcome: StageOutcome) -> list[dict]:
    """Per-epoch records of the stage: from training, or from the cached or loaded checkpoint."""
    if outcome.result is not None:
        return outcome.result.history
    saved = read_checkpoint(outcome.path, "checkpoint")
    return list(saved.get("history") or []) if isinstance(saved, dict) else []


def export(ctx: RunContext, outcome: StageOutcome, role: str, key: str, history: list[dict], metrics: dict) -> None:
    """checkpoints/last.pt (the weights later runs use), best.pt and TensorBoard curves in the run directory.

    best.pt is the best epoch's weights: the stage's best.pt where it holds one (the cache entry keeps a
    best.pt only when the best epoch is not the last), else the final weights, which are then the best
    (or, for a loaded checkpoint, the only ones there are).
    """
    checkpoints = ctx.run_dir / "checkpoints"
    save_model(checkpoints / "last.pt", outcome.model, ctx.meta(role), key, history=history, source=outcome.source)
    best = Path(outcome.path).parent / "best.pt"
    kept_best = outcome.source in ("trained", "cache") and best.is_file()
    copy_atomic(best if kept_best else checkpoints / "last.pt", checkpoints / "best.pt")
    writer = open_writer(ctx.run_dir)
    try:
        for record in history:
            for name in ("loss", "train_top1", "val_top1"):
                if name in record:
                    writer.add_scalar(f"epoch/{name}", record[name], record["epoch"])
        log_test_scalars(writer, {f"{key}_top1": metrics["top1"], f"{key}_top5": metrics["top5"]})
    finally:
        writer.close()

"""A pruning run's results (prune.ratio, README "Pruning"): metrics.json's `pruning` key (the ratio asked for and
achieved; params, FLOPs, latency and throughput before and after), a line under the table, and, when an already
trained student was pruned (prune.source=student with student.checkpoint), its accuracy before pruning as a row."""
from __future__ import annotations

from kdrun.config.prune_checks import pruning
from kdrun.engine.checkpoint import load_model_weights
from kdrun.evaluation.metrics import classification_metrics
from kdrun.models import create_model
from kdrun.paradigms.result import ParadigmResult, measured_cost, model_metrics, predict_test_split
from kdrun.stages.context import RunContext
from kdrun.stages.prune import footer_line, pruning_metrics


def report_pruning(ctx: RunContext, result: ParadigmResult) -> None:
    """Adds `pruning` (and `student_unpruned`) to `result` before the run's models are timed together."""
    if not pruning(ctx.cfg) or result.deployable is None:
        return
    key, student = result.deployable
    summary = pruning_metrics(ctx, result.models.get(key))
    if summary is None:
        return
    cfg = ctx.cfg.student
    unpruned = create_model(cfg.name, ctx.data.num_classes, ctx.data.in_chans, role="student",
                            image_size=ctx.data.image_size, **dict(cfg.kwargs)).to(ctx.device)
    if ctx.cfg.prune.source == "student" and cfg.get("checkpoint"):
        # the trained student before pruning: its accuracy is what the fine-tune recovers towards
        load_model_weights(unpruned, cfg.checkpoint, "student.checkpoint", cfg.name, ctx.data.num_classes)
        logits, labels = predict_test_split(ctx, unpruned)
        trained = model_metrics(ctx, unpruned, cfg.name, logits, labels, source="checkpoint", path=str(cfg.checkpoint))
        result.models[f"{key}_unpruned"] = trained
        teacher_rows = [i for i, (label, _) in enumerate(result.rows) if label == "teacher"]
        result.rows.insert(teacher_rows[0] + 1 if teacher_rows else 0, ("unpruned", trained))  # before the pruned
    # what the fine-tune starts from: the pruned weights before any training (a fresh build prunes them again)
    pruned_logits, pruned_labels = predict_test_split(ctx, ctx.build_model("student").to(ctx.device))
    summary["pruned_top1"] = classification_metrics(pruned_logits, pruned_labels)["top1"]
    # params, FLOPs, then latency and throughput once the run's models are timed (together: comparable)
    summary["before"] = measured_cost(ctx, unpruned, cfg.name)
    summary["after"] = measured_cost(ctx, student, cfg.name)
    summary.update(flops_before=summary["before"]["flops"], flops_after=summary["after"]["flops"],
                   flops_ratio=summary["after"]["flops"] / summary["before"]["flops"])
    result.extra["pruning"] = summary
    earlier = result.footer
    result.footer = lambda metrics: "\n".join(line for line in (earlier(metrics), footer_line(metrics["pruning"]))
                                              if line)

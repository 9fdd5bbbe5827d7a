"""Evaluation and reporting shared by the paradigms: test-split metrics of each model, the derived
comparisons, metrics.json and the printed table (the same keys and columns as an offline run)."""
from __future__ import annotations

import time
from typing import Optional

import torch
from torch import nn

from kdrun import __version__
from kdrun.evaluation.cost import count_parameters, model_cost, timing_context
from kdrun.engine.evaluate import predict
from kdrun.engine.trainer import StageResult
from kdrun.evaluation.metrics import classification_metrics
from kdrun.config.paradigm_checks import paradigm_name
from kdrun.run_files import METRICS_FILE, write_json_atomic
from kdrun.stages.roles import RunContext
from kdrun.evaluation.table import model_table


def test_logits(ctx: RunContext, model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    return predict(model, ctx.data.test, ctx.cfg.batch_size, ctx.device)


def model_metrics(ctx: RunContext, model: nn.Module, name: str, logits: torch.Tensor, labels: torch.Tensor,
                  cost: Optional[dict] = None, **extra) -> dict:
    """top-1/top-5/NLL/ECE of `logits`, and the cost of `model`, as in an offline run's metrics.json."""
    metrics = classification_metrics(logits, labels)
    metrics.update(name=name, **extra)
    metrics.update(cost if cost is not None else measured_cost(ctx, model, name))
    return metrics


_measured: dict[tuple, dict] = {}


def measured_cost(ctx: RunContext, model: nn.Module, name: str) -> dict:
    """params, FLOPs, latency, throughput of `model`, measured once per architecture in a run: the
    generations and peers of one architecture cost the same, and each measurement takes seconds on a CPU."""
    key = (str(ctx.run_dir), name, count_parameters(model))
    if key not in _measured:
        _measured[key] = model_cost(model, (ctx.data.in_chans, *ctx.data.image_size), ctx.cfg.batch_size,
                                    ctx.device)
    return dict(_measured[key])


def combined_cost(costs: list[dict]) -> dict:
    """The cost of running several models one after another (an ensemble, a group of teachers)."""
    return {"params": sum(c["params"] for c in costs), "flops": sum(c["flops"] for c in costs),
            "latency_ms": sum(c["latency_ms"] for c in costs),
            "throughput": 1.0 / sum(1.0 / c["throughput"] for c in costs)}


def training_summary(result: StageResult) -> dict:
    return {"best_top1": result.best_top1, "best_epoch": result.best_epoch, "last_top1": result.last_top1}


def header(ctx: RunContext) -> dict:
    cfg, data = ctx.cfg, ctx.data
    return {
        "status": "completed",
        "kdrun_version": __version__,
        "paradigm": paradigm_name(cfg),
        "dataset": {"name": data.name, "num_classes": data.num_classes, "train_size": len(data.train),
                    "test_size": len(data.test)},
        "method": cfg.distill.get("name", "custom"),
        "T": cfg.T,
        "alpha": cfg.alpha,
        "seed": cfg.seed,
        "device": str(ctx.device),
        "overrides": list(ctx.overrides),  # a re-run sweep skips a job completed with the same ones
    }


def comparisons(student: Optional[dict], teacher: Optional[dict], baseline: Optional[dict]) -> dict:
    """gain_over_baseline, retained, compression, speedup; null where a model is missing."""
    def ratio(a: Optional[dict], b: Optional[dict], key: str) -> Optional[float]:
        return a[key] / b[key] if a and b and b[key] > 0 else None

    return {
        "gain_over_baseline": student["top1"] - baseline["top1"] if student and baseline else None,
        "retained": ratio(student, teacher, "top1"),
        "compression": ratio(teacher, student, "params"),
        "speedup": ratio(teacher, student, "latency_ms"),
    }


def finish(ctx: RunContext, metrics: dict, started: float, rows: list[tuple[str, Optional[dict]]],
           footer: str = "") -> dict:
    """Add timing, write metrics.json atomically, print the table; returns the metrics."""
    metrics["timing"] = timing_context(ctx.device)
    metrics["seconds"] = round(time.perf_counter() - started, 2)
    write_json_atomic(metrics, ctx.run_dir / METRICS_FILE)
    print(table(rows, footer))
    return metrics


def table(rows: list[tuple[str, Optional[dict]]], footer: str = "") -> str:
    lines = model_table(rows)
    if footer:
        lines.append(footer)
    return "\n".join(lines)


def log_test_scalars(writer, values: dict[str, float], step: int = 0) -> None:
    """Test-split results as TensorBoard scalars (test/<name>), next to the training curves."""
    for name, value in values.items():
        writer.add_scalar(f"test/{name}", value, step)
    writer.flush()

"""A paradigm's results as the run's outputs: metrics.json (stable keys, README "metrics.json"), the
TensorBoard summary (HParams, reliability diagrams) and the printed table."""
from __future__ import annotations

import time
from typing import Optional

from kdrun import __version__
from kdrun.engine import distributed
from kdrun.evaluation.cost import timing_context
from kdrun.evaluation.table import model_table
from kdrun.paradigms.result import ParadigmResult
from kdrun.run_files import METRICS_FILE, write_json_atomic
from kdrun.stages.context import RunContext
from kdrun.tensorboard.writer import write_run_summary


def run_metrics(ctx: RunContext, paradigm: str, result: ParadigmResult, started: float) -> dict:
    """metrics.json of a completed run: the header, each model, the comparisons, the paradigm's own keys."""
    cfg, data, speed = ctx.cfg, ctx.data, ctx.speed
    models = result.models
    return {
        "status": "completed",
        "kdrun_version": __version__,
        "paradigm": paradigm,
        "dataset": {"name": data.name, "num_classes": data.num_classes, "train_size": len(data.train),
                    "test_size": len(data.test), **({"val_size": len(data.val)} if data.val is not None else {})},
        "method": cfg.distill.get("name", "custom"),
        "T": cfg.T,
        "alpha": cfg.alpha,
        "temperatures": result.temperatures,  # what each loss term used: T, paradigm.T or a term's own list
        "seed": cfg.seed,
        "device": str(ctx.device),
        "overrides": list(ctx.overrides),  # a re-run sweep skips a job completed with the same ones
        **models,
        **comparisons(models.get("student"), models.get("teacher"), models.get("baseline")),
        **result.extra,
        "timing": timing_context(ctx.device),
        "speed": {"precision": speed.precision, "channels_last": speed.channels_last, "compile": speed.compile,
                  "processes": distributed.shard()[1], "teacher_cache": bool(cfg.teacher.cache)},
        "history": result.history,
        "seconds": round(time.perf_counter() - started, 2),
    }


def comparisons(student: Optional[dict], teacher: Optional[dict], baseline: Optional[dict]) -> dict:
    """gain_over_baseline, retained, compression, speedup; null where a model is missing."""
    def ratio(a: Optional[dict], b: Optional[dict], key: str) -> Optional[float]:
        if not a or not b or a.get(key) is None or b.get(key) is None:  # a stored teacher has no size or speed
            return None
        return a[key] / b[key] if b[key] > 0 else None

    return {
        "gain_over_baseline": student["top1"] - baseline["top1"] if student and baseline else None,
        "retained": ratio(student, teacher, "top1"),
        "compression": ratio(teacher, student, "params"),
        "speedup": ratio(teacher, student, "latency_ms"),
    }


def write_results(ctx: RunContext, result: ParadigmResult, metrics: dict) -> None:
    """metrics.json (atomically), the TensorBoard summary and the table; rank 0 alone under torchrun."""
    if not distributed.is_main():
        return
    ctx.run_dir.mkdir(parents=True, exist_ok=True)  # Hydra makes it for the CLI; not for other callers
    write_json_atomic(metrics, ctx.run_dir / METRICS_FILE)
    write_run_summary(ctx.run_dir, ctx.cfg, metrics, result.test_logits, result.labels, sweep_job_number())
    print(table(result.rows, result.footer(metrics)))


def sweep_job_number() -> Optional[int]:
    """This job's number when it runs in a Hydra multirun; None for a single run (or outside Hydra)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return None
    hydra_cfg = HydraConfig.get()
    return int(hydra_cfg.job.num) if hydra_cfg.mode == RunMode.MULTIRUN else None


def table(rows: list[tuple[str, Optional[dict]]], footer: str = "") -> str:
    lines = model_table(rows)
    if footer:
        lines.append(footer)
    return "\n".join(lines)

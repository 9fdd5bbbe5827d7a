"""TensorBoard event files, written with torch's SummaryWriter: final scalars, HParams, layouts, figures.

Everything a run writes lands in its own directory (one TensorBoard run per kdrun run), so the
HParams tab of `tensorboard --logdir <sweep dir>` lists exactly the sweep's jobs.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional

import torch
from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams

from kdrun.engine.ranks import is_main

MODEL_KEYS = ("top1", "top5", "nll", "ece", "params", "flops", "latency_ms", "throughput")
STUDENT_KEYS = ("best_top1", "agreement", "kl_t1", "kl_T")
RUN_KEYS = ("gain_over_baseline", "retained", "compression", "speedup")

# The metric columns of the HParams tab (all final/* scalars are in the Scalars tab).
HPARAM_METRICS = ("final/student/top1", "final/student/best_top1", "final/teacher/top1", "final/baseline/top1",
                  "final/gain_over_baseline", "final/student/agreement", "final/student/kl_T", "final/student/ece",
                  "final/student/nll", "final/retained", "final/compression", "final/speedup")

# Overrides that name a main hparam another way (teacher.name=... is the `teacher` column).
_SAME_AS_MAIN = {"teacher.name": "teacher", "student.name": "student", "dataset.name": "dataset",
                 "distill": "method", "distill.name": "method"}

# Custom Scalars tab: one chart of every loss term, one of student vs teacher accuracy. Regular
# expressions, so the layout is the same for every method and TensorBoard merges it across runs.
LAYOUT = {
    "distillation": {
        "loss terms (per step)": ["Multiline", [r"^train/loss"]],
        "student vs teacher top-1 (per epoch)": ["Multiline", [r"^epoch/(val_top1|train_top1|teacher_val_top1)$"]],
    },
}


class _NoWriter:
    """What processes other than rank 0 of a torchrun launch log to: nothing."""

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


def open_writer(log_dir: Path) -> SummaryWriter:
    if not is_main():
        return _NoWriter()
    Path(log_dir).mkdir(parents=True, exist_ok=True)
    return SummaryWriter(log_dir=str(log_dir))


def write_layout(writer: SummaryWriter) -> None:
    writer.add_custom_scalars(LAYOUT)


def final_scalars(metrics: dict) -> dict[str, float]:
    """Tag -> value of the run's final test-split metrics (absent models and null values left out)."""
    scalars = {}
    for role in ("teacher", "baseline", "student"):
        model = metrics.get(role) or {}
        keys = MODEL_KEYS + (STUDENT_KEYS if role == "student" else ())
        scalars.update({f"final/{role}/{key}": model[key] for key in keys if _is_number(model.get(key))})
    scalars.update({f"final/{key}": metrics[key] for key in RUN_KEYS if _is_number(metrics.get(key))})
    return {tag: float(value) for tag, value in scalars.items()}


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def run_hparams(cfg, metrics: dict, overrides: list[str]) -> dict[str, Any]:
    """The main config values, then every overridden key (its resolved value where it is a scalar)."""
    from omegaconf import OmegaConf

    values = {"teacher": cfg.teacher.name, "student": cfg.student.name, "dataset": metrics["dataset"]["name"],
              "method": metrics["method"], "T": cfg.T, "alpha": cfg.alpha, "epochs": cfg.epochs, "lr": cfg.lr,
              "batch_size": cfg.batch_size, "seed": cfg.seed}
    for override in overrides:
        if override.startswith("~") or "=" not in override:
            continue
        key, text = override.split("=", 1)
        key = key.lstrip("+")
        if key in _SAME_AS_MAIN or key in values:
            continue
        value = OmegaConf.select(cfg, key, default=None)
        values[key] = value if isinstance(value, (bool, int, float)) else text  # groups, strings: as typed
    # The HParams tab takes numbers, strings and booleans; show booleans as true/false like the config.
    return {key: (str(v).lower() if isinstance(v, bool) else v) for key, v in values.items() if v is not None}


def write_run_summary(run_dir: Path, cfg, metrics: dict, logits: Optional[dict[str, torch.Tensor]] = None,
                      labels: Optional[torch.Tensor] = None) -> None:
    """Final scalars, the HParams entry and (with tb_figures > 0) the reliability diagram of the run."""
    scalars = final_scalars(metrics)
    step = len(metrics.get("history") or [])  # the last epoch of the distill stage
    writer = open_writer(run_dir)
    try:
        for tag, value in scalars.items():
            writer.add_scalar(tag, value, step)
        hparam_values = run_hparams(cfg, metrics, metrics.get("overrides", []))
        metric_tags = {tag: scalars[tag] for tag in HPARAM_METRICS if tag in scalars}
        # torch's add_hparams would open a second run (a subdirectory); the run's own writer keeps one.
        for summary in hparams(hparam_values, metric_tags):
            writer.file_writer.add_summary(summary, step)
        if logits and labels is not None and int(cfg.get("tb_figures", 0)) > 0:
            from kdrun.evaluation.metrics import ECE_BINS
            from kdrun.tensorboard.figures import figure_to_array, reliability_figure

            figure = reliability_figure({name: (value, labels) for name, value in logits.items()}, ECE_BINS)
            writer.add_image("calibration/reliability", figure_to_array(figure), step, dataformats="HWC")
    finally:
        writer.close()

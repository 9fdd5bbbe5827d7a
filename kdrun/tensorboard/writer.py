"""TensorBoard event files, written with torch's SummaryWriter: HParams, layouts, figures, cache run names.

Everything a run writes lands in its own directory (one TensorBoard run per kdrun run), so the
HParams tab of `tensorboard --logdir <sweep dir>` lists exactly the sweep's jobs.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Optional

import torch
from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams

from kdrun.engine.ranks import is_main
from kdrun.run_files import deployed_artifacts
from kdrun.tensorboard.hparams_config import SAME_AS_MAIN

# Custom Scalars tab: accuracy first (student, baseline and teacher top-1 on one chart; the gain over the
# baseline on another), then one chart per loss term. Regular expressions anchored on whole tags, so a
# chart never mixes in another term; TensorBoard merges the layouts of all runs, dropping duplicates.
TOP1_CHART = "top-1: student, baseline, teacher (per epoch)"
GAIN_CHART = "gain over baseline, top-1 (per epoch)"


def layout(loss_terms: list[str]) -> dict:
    """The Custom Scalars layout of a run whose loss has these terms (`ce`, `kd`, ...)."""
    losses = {f"train/{name}": ["Multiline", [f"^train/{name}$"]]
              for name in ["loss", *(f"loss_{term}" for term in loss_terms)]}
    return {
        "accuracy": {TOP1_CHART: ["Multiline", [r"^epoch/(val_top1|baseline_val_top1|teacher_val_top1)$"]],
                     GAIN_CHART: ["Multiline", [r"^epoch/gain_over_baseline$"]]},
        "loss terms (per step)": losses,
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


def write_layout(writer: SummaryWriter, loss_terms: list[str]) -> None:
    writer.add_custom_scalars(layout(loss_terms))


def cache_run_name(stage: str, model: str, dataset: str, key: str) -> str:
    """The TensorBoard run (a folder in the cache entry's tb/) of a cached stage: `teacher-cifar_resnet14-digits-a3ea12`."""
    return re.sub(r"[^A-Za-z0-9_.=-]", "_", f"{stage}-{model}-{dataset}-{key[:6]}")


def run_hparams(cfg, metrics: dict, overrides: list[str], job: str) -> dict[str, Any]:
    """The job's name, the main config values, then every overridden key (its resolved value where it is a scalar)."""
    from omegaconf import OmegaConf

    values = {"job": job, "teacher": cfg.teacher.name, "student": cfg.student.name, "dataset": metrics["dataset"]["name"],
              "method": metrics["method"], "T": cfg.T, "alpha": cfg.alpha, "epochs": cfg.epochs, "lr": cfg.lr,
              "batch_size": cfg.batch_size, "seed": cfg.seed}
    for override in overrides:
        if override.startswith("~") or "=" not in override:
            continue
        key, text = override.split("=", 1)
        key = key.lstrip("+")
        if key in SAME_AS_MAIN or key in values:
            continue
        value = OmegaConf.select(cfg, key, default=None)
        values[key] = value if isinstance(value, (bool, int, float)) else text  # groups, strings: as typed
    # The HParams tab takes numbers, strings and booleans; show booleans as true/false like the config.
    return {key: (str(v).lower() if isinstance(v, bool) else v) for key, v in values.items() if v is not None}


def write_run_summary(run_dir: Path, cfg, metrics: dict, logits: Optional[dict[str, torch.Tensor]] = None,
                      labels: Optional[torch.Tensor] = None, sweep_job: Optional[int] = None) -> None:
    """The HParams entry of the run and (with tb_figures > 0) its reliability diagrams.

    `sweep_job`: the job's number in a multirun, None for a single run. The HParams config (which
    columns, in which order) is the sweep's, written once in its own run (kdrun.tensorboard.sweep_run).
    The teacher's diagram is drawn once per sweep, by job 0 (and by a single run).
    The final numbers are the last points of the per-epoch curves (kdrun.tensorboard.curves): no
    single-point charts.
    """
    step = len(metrics.get("history") or [])  # the last epoch of the distill stage
    writer = open_writer(run_dir)
    try:
        hparam_values = run_hparams(cfg, metrics, metrics.get("overrides", []), Path(run_dir).name)
        # torch's add_hparams would open a second run (a subdirectory); the run's own writer keeps one.
        # torch's experiment summary is left out: the config is the sweep's (hparams_config_summary).
        _, session_start, session_end = hparams(hparam_values, {})
        writer.file_writer.add_summary(session_start, step)
        writer.file_writer.add_summary(session_end, step)
        write_artifacts(writer, metrics, step)
        if logits and labels is not None and int(cfg.get("tb_figures", 0)) > 0:
            _reliability_images(writer, cfg, logits, labels, step, teacher=sweep_job in (None, 0))
    finally:
        writer.close()


# The deployed artifacts (export=, quantize=): metrics.json's `<role>_<kind>` entries, e.g. `student_int8`.
# They are measured once, after training: scalars at the last epoch's step (the HParams tab's columns read
# them) under `deploy/`, and a Text table beside the PyTorch model they came from.
ARTIFACT_SCALARS = (("top1", "top-1"), ("size_mb", "size (MB)"), ("latency_ms", "latency (ms)"))


def artifact_scalars(metrics: dict) -> list[tuple[str, str, float]]:
    """(tag, display name, value) of each artifact scalar a run with these metrics writes."""
    return [(f"deploy/{key}_{field}", f"{key.split('_', 1)[-1]} {name}", float(value[field]))
            for key, value in deployed_artifacts(metrics).items()
            for field, name in ARTIFACT_SCALARS if isinstance(value.get(field), (int, float))]


def write_artifacts(writer, metrics: dict, step: int) -> None:
    for tag, _, value in artifact_scalars(metrics):
        writer.add_scalar(tag, value, step)
    rows = []
    for key, value in deployed_artifacts(metrics).items():
        source = metrics.get(key.split("_", 1)[0]) or {}
        rows.append(f"| {key} | {100 * value['top1']:.2f} | {-100 * value['top1_drop']:+.2f} | "
                    f"{_number(value.get('size_mb'))} | {_number(source.get('size_mb'))} | "
                    f"{_number(value.get('latency_ms'))} | {_number(source.get('latency_ms'))} |")
    if rows:
        header = ["| artifact | top-1 (%) | vs PyTorch (points) | size (MB) | PyTorch size (MB) | latency (ms) "
                  "| PyTorch latency (ms) |", "| --- | --- | --- | --- | --- | --- | --- |"]
        writer.add_text("deploy/artifacts", "\n".join(header + rows), step)


def _number(value) -> str:
    return f"{value:.2f}" if isinstance(value, (int, float)) else "-"


def _reliability_images(writer, cfg, logits: dict[str, torch.Tensor], labels: torch.Tensor, step: int,
                        teacher: bool) -> None:
    """`calibration/reliability`: baseline and student side by side; `calibration/teacher`: the teacher's."""
    from kdrun.evaluation.metrics import ECE_BINS
    from kdrun.tensorboard.figures import figure_to_array, reliability_figure

    title = f"T={cfg.T:g}, alpha={cfg.alpha:g}"
    students = {name: (value, labels) for name, value in logits.items() if name != "teacher"}
    if students:
        figure = reliability_figure(students, ECE_BINS, title)
        writer.add_image("calibration/reliability", figure_to_array(figure), step, dataformats="HWC")
    if teacher and "teacher" in logits:
        figure = reliability_figure({"teacher": (logits["teacher"], labels)}, ECE_BINS, "the sweep's teacher")
        writer.add_image("calibration/teacher", figure_to_array(figure), step, dataformats="HWC")

"""One experiment: set up the run, let its paradigm train and evaluate the models, write the results.

    cli -> run.pipeline -> paradigms (which models, how) -> stages (a model in a role, the stage cache)
        -> engine (the one training loop) -> distill / models / data

The config must have passed kdrun.config's checks (the CLI runs them before torch loads).
"""
from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Optional

import torch
from omegaconf import DictConfig, OmegaConf

from kdrun import __version__
from kdrun.config.paradigm_checks import paradigm_name, unread_settings
from kdrun.config.prune_checks import student_config
from kdrun.data import build_dataset, describe
from kdrun.evaluation.cost import timing_budget
from kdrun.distill import check_terms, needs_strong_view
from kdrun.engine import distributed
from kdrun.engine.seeding import seed_everything
from kdrun.engine.speed import build_speed
from kdrun.errors import KdrunError
from kdrun.models import check_model_name
from kdrun.paradigms import PARADIGMS
from kdrun.paradigms.result import time_models_of
from kdrun.run.artifacts import check_exportable, compare_speed, deploy
from kdrun.run.preflight import preflight
from kdrun.run.pruning import report_pruning
from kdrun.run.results import run_metrics, write_results
from kdrun.stages.context import RunContext

log = logging.getLogger("kdrun")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise KdrunError(f"device={name} is not a device: use auto, cpu, cuda, cuda:N or mps") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise KdrunError(f"device={name} but no CUDA GPU is visible: use device=cpu or device=auto")
    count = torch.cuda.device_count() if device.type == "cuda" else 0
    if device.type == "cuda" and device.index is not None and device.index >= count:
        choices = "device=cuda:0" if count == 1 else f"device=cuda:0 to cuda:{count - 1}"
        raise KdrunError(f"device={name} but {count} CUDA GPU(s) are visible: use {choices} or device=auto")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise KdrunError(f"device={name} but MPS is not available here: use device=cpu or device=auto")
    return device


def show_progress(setting) -> bool:
    setting = str(setting).lower()
    return sys.stderr.isatty() if setting == "auto" else setting == "true"


def run_experiment(cfg: DictConfig, run_dir: Path, overrides: Optional[list[str]] = None) -> dict:
    """Run the experiment described by `cfg` into `run_dir` and return its metrics (metrics.json).

    `overrides`: the command-line overrides that made `cfg`, kept in metrics.json (a re-run sweep compares them).
    """
    started = time.perf_counter()
    cfg = student_config(cfg)  # prune.source=teacher: the student is the teacher's architecture, pruned
    paradigm = PARADIGMS.get(paradigm_name(cfg), "paradigm.name")
    ctx = build_context(cfg, run_dir, overrides)
    result = paradigm(ctx)
    report_pruning(ctx, result)  # prune.ratio: params, FLOPs and speed before and after
    failure = deploy(ctx, result)  # export=, quantize=: artifacts checked on the test split
    time_models_of(result.models, result.rows, result.extra)  # the run's models, timed together, interleaved
    compare_speed(result)
    metrics = run_metrics(ctx, paradigm_name(cfg), result, started)
    write_results(ctx, result, metrics)
    if failure is not None:  # the training results are written: nothing trained is lost
        raise failure
    return metrics


def build_context(cfg: DictConfig, run_dir: Path, overrides: Optional[list[str]] = None) -> RunContext:
    """Device, speed switches, dataset and the checks that need them (kdrun.run.preflight), before any stage trains."""
    seed_everything(cfg.seed)
    timing_budget()  # a bad KDRUN_TIMING_BUDGET_S ends the run now, not after training
    check_terms(cfg.distill)  # each term's type and options against its registered class
    check_model_name(cfg.teacher.name, "teacher")
    check_model_name(cfg.student.name, "student")
    device = distributed.setup(resolve_device(cfg.device), cfg.device)  # torchrun: this process's device
    distributed.check_batch_size(cfg.batch_size)
    speed = build_speed(cfg.precision, cfg.channels_last, cfg.compile, device)
    run_dir = Path(distributed.from_rank_zero(str(run_dir)))  # rank 0's directory, for resuming
    data = build_dataset(cfg.dataset)
    if cfg.teacher.cache:
        from kdrun.engine.teacher_cache import check_cacheable

        check_cacheable(data.train, data.name)  # before any stage trains
        if needs_strong_view(OmegaConf.to_container(cfg.distill, resolve=True)):
            raise KdrunError("teacher.cache=true cannot serve mlkd's strong views (new random images every step): "
                             "pass teacher.cache=false, or distill.terms.mlkd.augment=false")
    if cfg.teacher.outputs or cfg.teacher.export_outputs:
        from kdrun.stages.stored_teacher import check_stored_run

        check_stored_run(cfg, data, device)  # the file against the dataset and the method, before any stage trains
    log.info("dataset %s; device %s; kdrun %s", describe(data), device, __version__)
    for note in unread_settings(cfg):
        log.warning(note)
    ctx = RunContext(cfg, data, device, run_dir, show_progress(cfg.progress) and distributed.is_main(), speed,
                     list(overrides or []))
    preflight(ctx, paradigm_name(cfg))  # every model of the run takes one training step: fail now, not after a stage
    check_exportable(ctx)  # export=/quantize=: the untrained model goes through torch.export
    return ctx

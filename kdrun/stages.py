"""The three model stages of an experiment: teacher, baseline student, distilled student.

Teacher and baseline do not depend on T or alpha, so they go through the stage cache and a sweep
trains each of them once.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from kdrun.config import stage_epochs, stage_lr
from kdrun.data import DataBundle
from kdrun.distill import build_loss, hard_label_loss
from kdrun.engine.cache import CacheEntry, stage_key
from kdrun.engine.checkpoint import FORMAT, load_model_weights, save_atomic
from kdrun.engine.trainer import Recipe, Stage, StageResult, train
from kdrun.models import create_model
from kdrun.tblog import open_writer

log = logging.getLogger("kdrun")


@dataclass
class StageOutcome:
    model: nn.Module
    source: str                        # trained, cache, checkpoint
    path: Optional[str] = None         # where its weights are
    result: Optional[StageResult] = None


@dataclass
class RunContext:
    cfg: DictConfig
    data: DataBundle
    device: torch.device
    run_dir: Path
    progress: bool

    @property
    def data_workers(self) -> int:
        return int(self.cfg.dataset.get("num_workers", 0))

    @property
    def cache_root(self) -> Path:
        return Path(self.cfg.cache_dir).expanduser()

    def recipe(self, role: str) -> Recipe:
        cfg = self.cfg
        return Recipe(epochs=stage_epochs(cfg, role), lr=stage_lr(cfg, role), batch_size=cfg.batch_size,
                      optim=_plain(cfg.optim), sched=_plain(cfg.sched), seed=cfg.seed)

    def build_model(self, role: str) -> nn.Module:
        model_cfg = self.cfg[role]
        # Seeding right before construction gives the baseline and the distilled student the same init.
        torch.manual_seed(self.cfg.seed)
        return create_model(model_cfg.name, self.data.num_classes, self.data.in_chans,
                            pretrained=model_cfg.pretrained, role=role, **_plain(model_cfg.kwargs))

    def meta(self, role: str) -> dict:
        return {"model_name": self.cfg[role].name, "num_classes": self.data.num_classes,
                "in_chans": self.data.in_chans, "dataset": self.data.name}


def _plain(node) -> dict:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)


def obtain_teacher(ctx: RunContext) -> StageOutcome:
    model = ctx.build_model("teacher")
    checkpoint = ctx.cfg.teacher.checkpoint
    if checkpoint:
        load_model_weights(model, checkpoint, "teacher.checkpoint", ctx.cfg.teacher.name, ctx.data.num_classes)
        log.info("teacher: loaded %s from %s", ctx.cfg.teacher.name, checkpoint)
        return StageOutcome(model, "checkpoint", str(checkpoint))
    return _cached_stage(ctx, "teacher", "teacher", model)


def obtain_baseline(ctx: RunContext) -> StageOutcome:
    return _cached_stage(ctx, "baseline", "student", ctx.build_model("student"))


def distill_student(ctx: RunContext, teacher: nn.Module, teacher_top1: float, resume: bool) -> StageOutcome:
    model = ctx.build_model("student")
    loss = build_loss(_plain(ctx.cfg.distill))
    writer = open_writer(ctx.run_dir)
    stage = Stage("student", ctx.recipe("student"), ctx.device, ctx.run_dir / "checkpoints",
                  ctx.meta("student"), writer, ctx.progress, {"teacher": teacher_top1},
                  num_workers=ctx.data_workers)
    try:
        result = train(stage, model, loss, ctx.data.train, ctx.data.test,
                       teacher=teacher if loss.needs_teacher else None, resume=resume)
    finally:
        writer.close()
    return StageOutcome(model, "trained", str(ctx.run_dir / "checkpoints" / "last.pt"), result)


def _cached_stage(ctx: RunContext, stage_name: str, role: str, model: nn.Module) -> StageOutcome:
    recipe = ctx.recipe(role)
    model_cfg = ctx.cfg[role]
    spec = {"stage": stage_name, "model": {"name": model_cfg.name, "pretrained": model_cfg.pretrained,
                                           "kwargs": _plain(model_cfg.kwargs)},
            "dataset": _plain(ctx.cfg.dataset), "recipe": vars(recipe)}
    entry = CacheEntry(ctx.cache_root, stage_name, stage_key(spec))
    with entry.lock():  # parallel sweep jobs wait here while one of them builds the stage
        if entry.exists():
            load_model_weights(model, entry.model_path, f"{stage_name} cache", model_cfg.name, ctx.data.num_classes)
            log.info("%s: reusing cached %s from %s", stage_name, model_cfg.name, entry.directory)
            return StageOutcome(model, "cache", str(entry.model_path))
        log.info("%s: training %s for %d epochs (cached in %s)", stage_name, model_cfg.name, recipe.epochs,
                 entry.directory)
        entry.write_spec(spec)
        writer = open_writer(entry.directory / "tb")
        stage = Stage(stage_name, recipe, ctx.device, entry.directory, ctx.meta(role), writer, ctx.progress,
                      num_workers=ctx.data_workers)
        try:
            result = train(stage, model, hard_label_loss(), ctx.data.train, ctx.data.test)
        finally:
            writer.close()
        save_atomic({"format": FORMAT, "version": 1, **ctx.meta(role), "stage": stage_name,
                     "model": model.state_dict(), "history": result.history, "spec": spec}, entry.model_path)
        return StageOutcome(model, "trained", str(entry.model_path), result)

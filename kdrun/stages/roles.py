"""The three model stages of an experiment: teacher, baseline student, distilled student.

Teacher and baseline do not depend on T or alpha, so they go through the stage cache and a sweep
trains each of them once.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from kdrun.config.schema import stage_epochs, stage_lr
from kdrun.data import DataBundle
from kdrun.data.strong_view import strong_view_for
from kdrun.distill import build_loss, hard_label_loss, needs_features
from kdrun.engine import distributed
from kdrun.engine.cache import CacheEntry, stage_key
from kdrun.engine.checkpoint import FORMAT, load_model_weights, save_atomic
from kdrun.engine.forward import FeaturePairing
from kdrun.engine.precision import Speed, numerics_key
from kdrun.engine.trainer import Recipe, Stage, StageResult, train
from kdrun.errors import KdrunError
from kdrun.models import create_model
from kdrun.tensorboard.soft_targets import soft_target_logger
from kdrun.tensorboard.writer import open_writer, write_layout

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
    speed: Speed = field(default_factory=Speed)
    overrides: list[str] = field(default_factory=list)  # the command line's, kept in metrics.json

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
                            pretrained=model_cfg.pretrained, role=role, image_size=self.data.image_size,
                            **_plain(model_cfg.kwargs))

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
        return StageOutcome(model.to(ctx.device), "checkpoint", str(checkpoint))
    return _cached_stage(ctx, "teacher", "teacher", model)


def obtain_baseline(ctx: RunContext) -> StageOutcome:
    return _cached_stage(ctx, "baseline", "student", ctx.build_model("student"))


def distill_student(ctx: RunContext, teacher: nn.Module, teacher_top1: float, resume: bool) -> StageOutcome:
    model = ctx.build_model("student").to(ctx.device)
    # Frozen from here on: even a dummy probe in train mode would move the teacher's BatchNorm statistics.
    teacher.to(ctx.device).eval().requires_grad_(False)
    distill_cfg = _plain(ctx.cfg.distill)
    pairing, shapes = None, None
    if needs_features(distill_cfg):
        pairing = pair_features(ctx, model, teacher, distill_cfg)
        shapes = pairing.shapes((ctx.data.in_chans, *ctx.data.image_size), ctx.data.num_classes,
                                len(ctx.data.train))
        log.info("features: student %s <-> teacher %s", [pairing.student.names[i] for i in pairing.student_index],
                 [pairing.teacher.names[i] for i in pairing.teacher_index])
    loss = build_loss(distill_cfg, shapes)
    outputs = None
    if ctx.cfg.teacher.cache and loss.needs_teacher:
        from kdrun.engine.teacher_cache import teacher_outputs_for_run

        outputs = teacher_outputs_for_run(ctx, teacher, pairing, ctx.speed)
        log.info("teacher outputs: %s %s", "reusing" if outputs.reused else "cached", outputs.directory)
    writer = open_writer(ctx.run_dir)
    write_layout(writer)
    figures = soft_target_logger(writer, ctx.data, model, teacher, ctx.cfg.T, int(ctx.cfg.tb_figures), ctx.device)
    stage = Stage("student", ctx.recipe("student"), ctx.device, ctx.run_dir / "checkpoints",
                  ctx.meta("student"), writer, ctx.progress, {"teacher": teacher_top1},
                  num_workers=ctx.data_workers, speed=ctx.speed)
    try:
        result = train(stage, model, loss, ctx.data.train, ctx.data.test,
                       teacher=teacher if loss.needs_teacher else None, resume=resume, features=pairing,
                       on_epoch=figures, teacher_outputs=outputs, strong_view=strong_view_for(loss, ctx.data))
    finally:
        writer.close()
    return StageOutcome(model, "trained", str(ctx.run_dir / "checkpoints" / "last.pt"), result)


def pair_features(ctx: RunContext, student: nn.Module, teacher: nn.Module, distill_cfg: dict) -> FeaturePairing:
    """Taps on both models and the pairs of maps the feature terms compare.

    Stages are matched by spatial reduction unless the user names layers on both sides
    (distill.student_layers / distill.teacher_layers), which then pair up in order.
    """
    from kdrun.models.features import build_feature_taps, match_stages  # only feature methods pay for it

    input_shape = (ctx.data.in_chans, *ctx.data.image_size)
    student_layers, teacher_layers = distill_cfg.get("student_layers"), distill_cfg.get("teacher_layers")
    student_taps = build_feature_taps(student, ctx.cfg.student.name, input_shape, student_layers, role="student")
    teacher_taps = build_feature_taps(teacher, ctx.cfg.teacher.name, input_shape, teacher_layers, role="teacher")
    if student_layers and teacher_layers:
        if len(student_layers) != len(teacher_layers):
            raise KdrunError(f"distill.student_layers names {len(student_layers)} layers and distill.teacher_layers "
                             f"{len(teacher_layers)}; name as many on both sides, they pair up in order")
        pairs = list(range(len(student_layers))), list(range(len(teacher_layers)))
    else:
        pairs = match_stages(student_taps, teacher_taps)
    return FeaturePairing(student_taps, teacher_taps, *pairs)


def _cached_stage(ctx: RunContext, stage_name: str, role: str, model: nn.Module) -> StageOutcome:
    recipe = ctx.recipe(role)
    model_cfg = ctx.cfg[role]
    spec = {"stage": stage_name, "model": {"name": model_cfg.name, "pretrained": model_cfg.pretrained,
                                           "kwargs": _plain(model_cfg.kwargs)},
            "dataset": _plain(ctx.cfg.dataset), "recipe": vars(recipe), **numerics_key(ctx.speed)}
    entry = CacheEntry(ctx.cache_root, stage_name, stage_key(spec))
    with distributed.rank_zero_lock(entry.lock):  # parallel sweep jobs wait here while one of them builds the stage
        if distributed.from_rank_zero(entry.complete()):
            load_model_weights(model, entry.model_path, f"{stage_name} cache", model_cfg.name, ctx.data.num_classes)
            log.info("%s: reusing cached %s from %s", stage_name, model_cfg.name, entry.directory)
            return StageOutcome(model.to(ctx.device), "cache", str(entry.model_path))
        log.info("%s: training %s for %d epochs (cached in %s)", stage_name, model_cfg.name, recipe.epochs,
                 entry.directory)
        if distributed.is_main():
            entry.write_spec(spec)
        writer = open_writer(entry.directory / "tb")
        stage = Stage(stage_name, recipe, ctx.device, entry.directory, ctx.meta(role), writer, ctx.progress,
                      num_workers=ctx.data_workers, speed=ctx.speed)
        try:
            result = train(stage, model, hard_label_loss(), ctx.data.train, ctx.data.test)
        finally:
            writer.close()
        if distributed.is_main():
            save_atomic({"format": FORMAT, "version": 1, **ctx.meta(role), "stage": stage_name,
                         "model": model.state_dict(), "history": result.history, "spec": spec}, entry.model_path)
        distributed.barrier()  # the others go on once the stage is in the cache
        return StageOutcome(model, "trained", str(entry.model_path), result)

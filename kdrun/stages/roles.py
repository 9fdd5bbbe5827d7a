"""The models of a run, each in a role: the teacher (loaded, cached or trained), the baseline student
(hard labels, cached) and the distilled student; paradigms add peers, generations and an assistant.

`train_role` is the one function that trains a model in any role. A role with a cache spec goes
through the stage cache (outputs/cache/<stage>/<key>/): teacher and baseline do not depend on T or
alpha, so a sweep trains each of them once, even with parallel jobs.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from torch import nn

from kdrun.data.bundle import validation_set
from kdrun.data.options import cache_key_options
from kdrun.data.strong_view import strong_view_for
from kdrun.distill import (DistillLoss, build_loss, hard_label_loss, needs_features, needs_head,
                           needs_teacher_classifier, wants_pre_relu)
from kdrun.engine import distributed
from kdrun.engine.cache import MODEL, CacheEntry, file_sha256, stage_key
from kdrun.engine.checkpoint import load_model_weights, save_model
from kdrun.engine.forward import FeaturePairing, StepForward
from kdrun.engine.speed import numerics_key
from kdrun.engine.trainer import Recipe, Stage, StageResult, train
from kdrun.errors import KdrunError
from kdrun.stages.context import RunContext, plain
from kdrun.stages.heads import fit_class_means, head_pairing
from kdrun.stages.prune import cache_key as pruning_key, remember_teacher
from kdrun.tensorboard.curves import validation_logger, write_reference_curves
from kdrun.tensorboard.soft_targets import soft_target_logger
from kdrun.tensorboard.writer import cache_run_name, open_writer, write_layout

log = logging.getLogger("kdrun")


@dataclass
class StageOutcome:
    model: nn.Module
    source: str                        # trained, cache, checkpoint
    path: Optional[str] = None         # where its weights are
    result: Optional[StageResult] = None
    loss: Optional[DistillLoss] = None  # what it was trained with, where this run trained it
    history: list = field(default_factory=list)  # per-epoch records of its stage (trained or cached); [] if loaded


@dataclass
class Role:
    """A model to train in one stage of a run, and what it learns from."""
    stage: str                      # teacher, baseline, student, peers, ...: log label, checkpoint's `stage`
    forward: StepForward            # the model (forward.student) and its teacher, cache, taps or strong view
    loss: DistillLoss
    meta: dict                      # model_name, num_classes, in_chans, dataset: kept in every checkpoint
    recipe: Recipe
    cache_spec: Optional[dict] = None   # set: trained once into the stage cache under this key, then reused
    reference: dict = field(default_factory=dict)   # accuracies drawn beside the validation curve
    on_epoch: Optional[Callable[[int, dict], None]] = None
    on_validation: Optional[Callable] = None   # (epoch, validation logits, labels) after each epoch
    writer: Any = None              # a TensorBoard writer the caller keeps open; None: one for this stage


@dataclass
class References:
    """What the distilled student's curves are drawn beside (kdrun.tensorboard.curves)."""
    curves: dict = field(default_factory=dict)   # teacher, baseline -> validation top-1 per epoch, from their stages
    flat: dict = field(default_factory=dict)     # a model without a history (a loaded teacher) -> its test top-1
    teacher_logits: Any = None                   # the teacher's test-split logits: per-epoch agreement and KL(T)


def train_role(ctx: RunContext, role: Role) -> StageOutcome:
    """Train the role's model (or reuse it from the stage cache); an interrupted stage resumes."""
    model = role.forward.student
    if role.cache_spec is None:
        log.info("%s: training %s for %d epoch%s with %s (checkpoints in %s)", role.stage, role.meta["model_name"],
                 role.recipe.epochs, "s" * (role.recipe.epochs != 1), " + ".join(role.loss.terms) or "no loss terms",
                 ctx.run_dir / "checkpoints")
        result = _train(ctx, role, ctx.run_dir / "checkpoints", ctx.run_dir)
        return StageOutcome(model, "trained", str(ctx.run_dir / "checkpoints" / "last.pt"), result, role.loss,
                            result.history)
    entry = CacheEntry(ctx.cache_root, role.stage, stage_key(role.cache_spec))
    name = role.meta["model_name"]
    with distributed.rank_zero_lock(entry.lock):  # parallel sweep jobs wait here while one of them builds the stage
        if distributed.from_rank_zero(entry.complete() if distributed.is_main() else None):
            meta = load_model_weights(model, entry.model_path, f"{role.stage} cache", name, ctx.data.num_classes)
            log.info("%s: reusing cached %s from %s", role.stage, name, entry.directory)
            return StageOutcome(model.to(ctx.device), "cache", str(entry.model_path), history=meta.get("history") or [])
        log.info("%s: training %s for %d epoch%s; cached in %s for later runs", role.stage, name, role.recipe.epochs,
                 "s" * (role.recipe.epochs != 1), entry.directory)
        result = _build_entry(ctx, role, entry)
        distributed.barrier()  # the others go on once the stage is in the cache
        return StageOutcome(model, "trained", str(entry.model_path), result, role.loss, result.history)


def _build_entry(ctx: RunContext, role: Role, entry: CacheEntry) -> StageResult:
    """Train the role into the entry's build directory (resuming an interrupted build), then make it the entry."""
    if distributed.is_main():
        entry.start_build(role.cache_spec)
    try:
        # tb/<stage>-<model>-<dataset>-<key>: a run name that says what the curves are, in any logdir
        run_name = cache_run_name(role.stage, role.meta["model_name"], ctx.cfg.dataset.name, entry.key)
        result = _train(ctx, role, entry.build_directory, entry.build_directory / "tb" / run_name)
    except BaseException:
        if distributed.is_main():
            entry.abandon_build()  # kept only with an epoch to resume from
        raise
    if distributed.is_main():
        save_model(entry.build_directory / MODEL, role.forward.student, role.meta, role.stage,
                   history=result.history, spec=role.cache_spec)
        entry.finish_build(role.cache_spec, keep_best=result.best_epoch != result.history[-1]["epoch"])
    return result


def _train(ctx: RunContext, role: Role, checkpoint_dir, log_dir) -> StageResult:
    writer = role.writer if role.writer is not None else open_writer(log_dir)
    stage = Stage(role.stage, role.recipe, ctx.device, checkpoint_dir, role.meta, writer, ctx.progress,
                  role.reference, num_workers=ctx.data_workers, speed=ctx.speed, on_epoch=role.on_epoch,
                  on_validation=role.on_validation)
    try:
        held_out = ctx.data.val is not None   # dataset.val_split: choose on it, report the test split per epoch
        return train(stage, role.forward, role.loss, ctx.data.train, validation_set(ctx.data),
                     test_set=ctx.data.test if held_out else None)
    finally:
        if role.writer is None:
            writer.close()


def hard_label_role(ctx: RunContext, stage: str, role: str) -> Role:
    """The model in `role` trained on hard labels alone, through the stage cache."""
    model_cfg, recipe = ctx.cfg[role], ctx.recipe(role)
    model = ctx.build_model(role)  # first: a bad checkpoint is a one-line error there
    model_spec = {"name": model_cfg.name, "pretrained": model_cfg.pretrained, "kwargs": plain(model_cfg.kwargs)}
    if model_cfg.get("checkpoint"):  # initial weights (student.checkpoint): keyed by content, not by path
        model_spec["checkpoint_sha256"] = file_sha256(Path(model_cfg.checkpoint).expanduser())
    if role == "student":
        model_spec.update(pruning_key(ctx))  # prune.ratio: how it was pruned, from which weights
    spec = {"stage": stage, "model": model_spec, "dataset": cache_key_options(plain(ctx.cfg.dataset)),
            "recipe": vars(recipe), **numerics_key(ctx.speed)}
    return Role(stage, StepForward(model), hard_label_loss(), ctx.meta(role), recipe, cache_spec=spec)


def obtain_teacher(ctx: RunContext) -> StageOutcome:
    checkpoint = ctx.cfg.teacher.checkpoint
    if checkpoint:
        model = ctx.build_model("teacher")  # with the checkpoint's weights
        log.info("teacher: loaded %s from %s", ctx.cfg.teacher.name, checkpoint)
        outcome = StageOutcome(model.to(ctx.device), "checkpoint", str(checkpoint))
    else:
        outcome = train_role(ctx, hard_label_role(ctx, "teacher", "teacher"))
    remember_teacher(ctx, outcome.model)  # prune.source=teacher: the weights the student is pruned from
    return outcome


def _say_where_the_student_starts(ctx: RunContext) -> None:
    """Once per stage that trains the student (not per build: the preflight builds it too)."""
    if ctx.cfg.student.get("checkpoint"):
        log.info("student: %s starts from the weights in %s", ctx.cfg.student.name, ctx.cfg.student.checkpoint)


def obtain_baseline(ctx: RunContext) -> StageOutcome:
    _say_where_the_student_starts(ctx)
    return train_role(ctx, hard_label_role(ctx, "baseline", "student"))


def distill_student(ctx: RunContext, teacher: Optional[nn.Module], teacher_top1: Optional[float] = None,
                    references: Optional[References] = None) -> StageOutcome:
    """The student (ctx's `student` role) trained with the run's distill method from `teacher` (None: the
    stored outputs of teacher.outputs); its TensorBoard run gets the reference curves (`references`; or
    else the teacher's `teacher_top1`, flat) and the per-epoch fidelity beside its own curves."""
    if references is None:
        references = References(flat={} if teacher_top1 is None else {"teacher": teacher_top1})
    _say_where_the_student_starts(ctx)
    model = ctx.build_model("student").to(ctx.device)
    if teacher is not None:
        # Frozen from here on: even a dummy probe in train mode would move the teacher's BatchNorm statistics.
        teacher.to(ctx.device).eval().requires_grad_(False)
    forward, loss = distill_forward(ctx, model, teacher)
    fit_class_means(ctx, forward, loss)
    if forward.features is not None:
        pairing = forward.features
        log.info("features: student %s <-> teacher %s", [pairing.student.names[i] for i in pairing.student_index],
                 [pairing.teacher.names[i] for i in pairing.teacher_index])
    writer = open_writer(ctx.run_dir)
    write_layout(writer, list(loss.terms))
    write_reference_curves(writer, references.curves)
    figures = None
    if teacher is not None:
        figures = soft_target_logger(writer, ctx.data, model, teacher, ctx.cfg.T, int(ctx.cfg.tb_figures),
                                     ctx.device, alpha=ctx.cfg.alpha)
    elif ctx.cfg.tb_figures:
        log.info("tensorboard: no soft-target figures (they run the teacher model; this one is stored outputs)")
    # The per-epoch agreement and KL compare validation logits with the teacher's test-split logits: not
    # with dataset.val_split, whose validation images are held out of the training set instead.
    teacher_logits = references.teacher_logits if ctx.data.val is None else None
    on_validation = validation_logger(writer, teacher_logits, ctx.cfg.T, references.curves.get("baseline"))
    try:
        return train_role(ctx, Role("student", forward, loss, ctx.meta("student"), ctx.recipe("student"),
                                    reference=references.flat, on_epoch=figures, on_validation=on_validation,
                                    writer=writer))
    finally:
        writer.close()


def distill_forward(ctx: RunContext, model: nn.Module, teacher: Optional[nn.Module],
                    cached_teacher: bool = True) -> tuple[StepForward, DistillLoss]:
    """What a step of the distill stage runs (`model` learning from the frozen `teacher` with the run's method)
    and its loss. `cached_teacher=False`: the live teacher even with teacher.cache=true (the run's preflight,
    which must not write the cache). `teacher=None`: the stored outputs of teacher.outputs (read, never written)."""
    distill_cfg = plain(ctx.cfg.distill)
    if teacher is None:
        return stored_forward(ctx, model, distill_cfg)
    pairing, shapes = None, None
    if needs_features(distill_cfg):
        pairing = pair_features(ctx, model, teacher, distill_cfg)
        shapes = pairing.shapes((ctx.data.in_chans, *ctx.data.image_size), ctx.data.num_classes,
                                len(ctx.data.train))
    heads = None
    if needs_head(distill_cfg):
        heads, shapes = head_pairing(ctx, model, teacher, distill_cfg, pairing)
    loss = build_loss(distill_cfg, shapes)
    distill_token_for(loss, model)
    outputs = None
    if cached_teacher and ctx.cfg.teacher.cache and loss.needs_teacher and heads is None:
        from kdrun.engine.teacher_cache import teacher_outputs_for_run

        outputs = teacher_outputs_for_run(ctx, teacher, pairing, ctx.speed)
        log.info("teacher outputs: %s %s", "reusing" if outputs.reused else "cached", outputs.directory)
    if cached_teacher and ctx.cfg.teacher.cache and heads is not None:
        log.info("teacher outputs: not cached (the method reads the teacher's final feature map; it runs live)")
    forward = StepForward(model, teacher if loss.needs_teacher else None, pairing, outputs,
                          strong_view_for(loss, ctx.data), heads=heads)
    return forward, loss


def stored_forward(ctx: RunContext, model: nn.Module, distill_cfg: dict) -> tuple[StepForward, DistillLoss]:
    """The distill stage's step with teacher.outputs: the stored rows in place of a teacher (a response method:
    stages.stored_teacher.check_method refused the others before the preflight)."""
    from kdrun.stages.stored_teacher import stored_teacher

    loss = build_loss(distill_cfg, None)
    distill_token_for(loss, model)
    outputs = stored_teacher(ctx.cfg, ctx.data, ctx.device).train
    return StepForward(model, None, None, outputs, strong_view_for(loss, ctx.data)), loss


def distill_token_for(loss: DistillLoss, model: nn.Module) -> None:
    """DeiT's term reads the student's distillation head: turn it on, or refuse a student without one."""
    from kdrun.distill.deit import enable_distill_token, needs_distill_token

    if needs_distill_token(loss):
        enable_distill_token(model)


def pair_features(ctx: RunContext, student: nn.Module, teacher: nn.Module, distill_cfg: dict) -> FeaturePairing:
    """Taps on both models and the pairs of maps the feature terms compare.

    Stages are matched by spatial reduction unless the user names layers on both sides
    (distill.student_layers / distill.teacher_layers), which then pair up in order.
    """
    from kdrun.models.features import build_feature_taps, match_stages  # only feature methods pay for it

    input_shape = (ctx.data.in_chans, *ctx.data.image_size)
    student_layers, teacher_layers = distill_cfg.get("student_layers"), distill_cfg.get("teacher_layers")
    pre_relu = wants_pre_relu(distill_cfg)
    student_taps = build_feature_taps(student, ctx.cfg.student.name, input_shape, student_layers, role="student",
                                      pre_relu=pre_relu)
    teacher_taps = build_feature_taps(teacher, ctx.cfg.teacher.name, input_shape, teacher_layers, role="teacher",
                                      pre_relu=pre_relu)
    for taps in (student_taps, teacher_taps) if pre_relu else ():
        if not taps.pre_relu:
            log.warning("%s %s: its feature maps are distilled as tapped, not before their activation (kdrun's "
                        "CIFAR ResNets and WRNs offer pre-ReLU maps)", taps.role, taps.model_name)
    if student_layers and teacher_layers:
        if len(student_layers) != len(teacher_layers):
            raise KdrunError(f"distill.student_layers names {len(student_layers)} layers and distill.teacher_layers "
                             f"{len(teacher_layers)}; name as many on both sides, they pair up in order")
        pairs = list(range(len(student_layers))), list(range(len(teacher_layers)))
    else:
        pairs = match_stages(student_taps, teacher_taps)
    return FeaturePairing(student_taps, teacher_taps, *pairs, teacher_classifier_for(teacher_taps, distill_cfg,
                                                                                    input_shape))


def teacher_classifier_for(teacher_taps, distill_cfg: dict, input_shape: tuple[int, int, int]) -> Optional[nn.Module]:
    """The teacher's classifier layer where a term reuses it (SRD), else None."""
    from kdrun.models.features_classifier import tapped_classifier

    return tapped_classifier(teacher_taps, input_shape) if needs_teacher_classifier(distill_cfg) else None

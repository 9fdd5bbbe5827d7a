"""The distill stage's pieces for terms that read the models' heads (kdrun.models.head): the split
models, and the teacher's class-mean embeddings (KD++'s class centers), computed once before training."""
from __future__ import annotations

import logging
import time

from torch import nn

from kdrun.distill import DistillLoss, FeatureShapes
from kdrun.engine.forward import FeaturePairing, StepForward
from kdrun.engine.group import ModelGroup
from kdrun.engine.head_forward import HeadPairing, teacher_class_means
from kdrun.errors import KdrunError
from kdrun.stages.context import RunContext

log = logging.getLogger("kdrun")


def pair_heads(ctx: RunContext, student: nn.Module, teacher: nn.Module, method: str) -> HeadPairing:
    from kdrun.models.head import build_head_split  # only head methods pay for it

    if isinstance(student, ModelGroup) or isinstance(teacher, ModelGroup):
        raise KdrunError(f"distill={method} reads one teacher's and one student's final feature maps: it does not "
                         "run with several teachers or peers; pick a logit method (kd, dkd, dist) for this paradigm")
    input_shape = (ctx.data.in_chans, *ctx.data.image_size)
    return HeadPairing(build_head_split(student, ctx.cfg.student.name, input_shape, role="student"),
                       build_head_split(teacher, ctx.cfg.teacher.name, input_shape, role="teacher"))


def head_pairing(ctx: RunContext, model: nn.Module, teacher: nn.Module, distill_cfg: dict,
                 pairing: FeaturePairing | None) -> tuple[HeadPairing, FeatureShapes]:
    """Both models split at their global pooling, and the shapes the head terms are built for."""
    method = distill_cfg.get("name", "custom")
    if pairing is not None:
        raise KdrunError(f"distill={method} mixes terms that read final feature maps (sdd, nd) with terms that "
                         "read intermediate features: use one kind per method")
    heads = pair_heads(ctx, model, teacher, method)
    return heads, heads.shapes(ctx.data.num_classes, len(ctx.data.train))


def fit_class_means(ctx: RunContext, forward: StepForward, loss: DistillLoss) -> None:
    """One pass of the frozen teacher over the training set; its per-class mean embeddings go to the terms
    that asked (the preflight skips it: those terms then see zero centers for one step)."""
    if not loss.needs_class_means:
        return
    teacher = forward.heads.teacher if forward.heads is not None else None
    if teacher is None and forward.features is not None:
        teacher = forward.features.teacher
    if teacher is None:
        raise KdrunError("the method needs the teacher's class-mean embeddings, but no live teacher model is there: "
                         "give the teacher model (teacher.name / teacher.checkpoint), not teacher.outputs")
    started = time.perf_counter()
    teacher.to(ctx.device)
    means = teacher_class_means(teacher, ctx.data.train, ctx.data.num_classes, ctx.cfg.batch_size, ctx.device)
    loss.set_class_means(means)
    log.info("teacher class means: %d classes x %d dims over %d training images (%.1f s)", means.shape[0],
             means.shape[1], len(ctx.data.train), time.perf_counter() - started)

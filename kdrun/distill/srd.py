"""SRD: softmax regression representation learning, the student's features through the teacher's classifier.

Yang, Martinez, Bulat & Tzimiropoulos, "Knowledge Distillation via Softmax Regression Representation
Learning", ICLR 2021 (openreview ZzwDy_wiWv).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from kdrun.distill.context import FeatureShapes, StepContext
from kdrun.distill.feature_common import check_pairs, feature_pairs
from kdrun.distill.registry import TERMS
from kdrun.errors import KdrunError

ADAPT = ("map", "embedding")


def connector(student_channels: int, teacher_channels: int) -> nn.Sequential:
    """1x1 convolution (no bias) + BatchNorm + ReLU, initialized as the authors' ``transfer_conv``."""
    conv = nn.Conv2d(student_channels, teacher_channels, kernel_size=1, bias=False)
    nn.init.normal_(conv.weight, 0.0, math.sqrt(2.0 / teacher_channels))
    return nn.Sequential(conv, nn.BatchNorm2d(teacher_channels), nn.ReLU())


@TERMS.register("srd", family="feature")
class SRDTerm(nn.Module):
    """The student's last features, mapped to the teacher's width, must match the teacher's features and,
    passed through the teacher's (frozen) classifier, give the teacher's logits:

        L = feat_weight * 1/(B*C) * sum_{b,c} (mean_hw r(F_s)_{b,c} - mean_hw F_t_{b,c})^2
            + 1/(B*K) * || W_t mean_hw r(F_s) - z_t ||^2

    with r a 1x1 conv + BN + ReLU (the authors' ``transfer_conv``), W_t the teacher's classifier and z_t its
    logits; the first part is the authors' ``statm_loss``, the second ``F.mse_loss`` (their training loops).

    `adapt: map` (default, the authors' code): r acts on the deepest matched student map, before pooling; the
    teacher's embedding must then be the global average of its deepest matched map (true of ResNets; a
    one-line error says otherwise: kdrun's WRNs apply their head's BN-ReLU after the tapped stage, where the
    authors' WRN hands SRD the map after it, so a WRN teacher takes `adapt: embedding`). `adapt: embedding`: r acts on the pooled embeddings (B, D, as 1x1 maps),
    as in SimKD's re-implementation (SRRL in Chen et al., CVPR 2022), for teachers whose head does more
    than pool (a WRN's BN-ReLU, MobileNetV3's conv head).
    """

    needs_teacher = True
    needs_features = True
    needs_teacher_classifier = True

    def __init__(self, shapes: FeatureShapes, adapt: str = "map", feat_weight: float = 1.0):
        super().__init__()
        if adapt not in ADAPT:
            raise KdrunError(f"distill.terms.srd.adapt={adapt!r} is not one of {', '.join(ADAPT)}: pass e.g. "
                             "distill.terms.srd.adapt=map")
        self.adapt, self.feat_weight = adapt, float(feat_weight)
        if adapt == "map":
            check_pairs(shapes, "srd")
            student, teacher = shapes.student_channels[-1], shapes.teacher_channels[-1]
            if shapes.teacher_dim and shapes.teacher_dim != teacher:
                raise KdrunError(_not_pooled(f"its embedding has {shapes.teacher_dim} features, its deepest "
                                             f"matched map {teacher} channels"))
        else:
            student, teacher = shapes.student_dim, shapes.teacher_dim
        self.connector = connector(student, teacher)
        self._checked = False

    def forward(self, ctx: StepContext) -> torch.Tensor:
        if ctx.teacher_classifier is None or ctx.teacher_logits is None:
            raise KdrunError("distill=srd got no teacher classifier; build the loss through kdrun's runner")
        if self.adapt == "map":
            student, teacher = feature_pairs(ctx)[-1]
            self._check_pooling(teacher, ctx.teacher_embedding)
        else:
            student, teacher = ctx.student_embedding[..., None, None], ctx.teacher_embedding.detach()[..., None, None]
        adapted = self.connector(student).mean(dim=(2, 3))       # (B, C_t): pooled after the connector
        features = (adapted - teacher.mean(dim=(2, 3))).pow(2).mean()
        logits = F.mse_loss(ctx.teacher_classifier(adapted), ctx.teacher_logits.detach())
        return self.feat_weight * features + logits

    def _check_pooling(self, teacher_map: torch.Tensor, teacher_embedding) -> None:
        """Once: the teacher's classifier reads the average of its deepest matched map (else adapt=embedding)."""
        if self._checked or teacher_embedding is None:
            return
        pooled, embedding = teacher_map.detach().float().mean(dim=(2, 3)), teacher_embedding.detach().float()
        scale = embedding.abs().max().clamp_min(1e-6)
        if pooled.shape != embedding.shape or (pooled - embedding).abs().max() > 1e-2 * scale:
            raise KdrunError(_not_pooled("its embedding is not the average of its deepest matched map"))
        self._checked = True


def _not_pooled(why: str) -> str:
    return (f"distill.terms.srd.adapt=map needs a teacher whose classifier reads its pooled last map, but {why}: "
            "pass distill.terms.srd.adapt=embedding")

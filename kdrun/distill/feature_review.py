"""ReviewKD (Chen, Liu, Zhao & Jia, CVPR 2021): knowledge review with attention-based fusion."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from kdrun.distill.context import FeatureShapes, StepContext
from kdrun.distill.feature_common import check_pairs, feature_pairs
from kdrun.distill.response import warmup_factor
from kdrun.distill.registry import TERMS
from kdrun.errors import KdrunError


def hcl(student: torch.Tensor, teacher: torch.Tensor, levels: Sequence[int] = (4, 2, 1)) -> torch.Tensor:
    """Hierarchical context loss between two maps of the same shape.

    The full-size MSE (weight 1) plus the MSE of both maps average-pooled to l x l for each pyramid
    level l smaller than the map's height, with weights 1/2, 1/4, ... in that order, divided by the
    sum of the weights used (as in the authors' code).
    """
    loss = F.mse_loss(student, teacher)
    weight, total = 1.0, 1.0
    for level in levels:
        if level >= student.shape[2]:
            continue
        weight /= 2
        pooled_s = F.adaptive_avg_pool2d(student, (level, level))
        pooled_t = F.adaptive_avg_pool2d(teacher, (level, level))
        loss = loss + weight * F.mse_loss(pooled_s, pooled_t)
        total += weight
    return loss / total


class ABF(nn.Module):
    """Attention-based fusion of one stage's student map with the fused map of the deeper stages.

    1x1 conv + BN to `mid` channels; when `fuse`, the deeper residual is upsampled (nearest) to this
    stage's size and the two are mixed with two sigmoid attention maps predicted from their
    concatenation; the result is resized (nearest, as the authors' code) to the teacher's size and a
    3x3 conv + BN gives the teacher's channels. Returns (output for the loss, fused map passed on to the shallower stage).
    """

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, fuse: bool):
        super().__init__()
        self.reduce = nn.Sequential(nn.Conv2d(in_channels, mid_channels, kernel_size=1, bias=False),
                                    nn.BatchNorm2d(mid_channels))
        self.project = nn.Sequential(nn.Conv2d(mid_channels, out_channels, kernel_size=3, padding=1, bias=False),
                                     nn.BatchNorm2d(out_channels))
        self.attention = (nn.Sequential(nn.Conv2d(2 * mid_channels, 2, kernel_size=1), nn.Sigmoid())
                          if fuse else None)
        nn.init.kaiming_uniform_(self.reduce[0].weight, a=1)    # as the authors' code
        nn.init.kaiming_uniform_(self.project[0].weight, a=1)

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor],
                out_size: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.reduce(x)
        if self.attention is not None:
            residual = F.interpolate(residual, size=x.shape[-2:], mode="nearest")
            weights = self.attention(torch.cat([x, residual], dim=1))
            x = x * weights[:, 0:1] + residual * weights[:, 1:2]
        if tuple(x.shape[-2:]) != tuple(out_size):
            x = F.interpolate(x, size=tuple(int(v) for v in out_size), mode="nearest")
        return self.project(x), x


@TERMS.register("reviewkd", family="feature")
class ReviewKDTerm(nn.Module):
    """Knowledge review: each teacher stage is distilled from a fusion of the student's same and deeper stages.

    Chen, Liu, Zhao & Jia, "Distilling Knowledge via Knowledge Review", CVPR 2021 (section 3):
        L = CE + lambda * sum_i HCL(ABF_i(F_s^i, fused_{i+1}), F_t^i)
    The ABF modules run from the deepest matched stage to the shallowest (the deepest does no
    fusion); each outputs a map with the teacher's channels and size at its stage, compared by the
    hierarchical context loss (:func:`hcl`). The term is scaled by the linear warm-up
    min((epoch + warmup_offset) / warmup_epochs, 1), epochs counted from 0: warmup_offset 0 (default) is the
    ReviewKD authors' CIFAR code, min(1, epoch / 20) with 0-based epochs, so the first epoch has weight 0;
    warmup_offset 1 is mdistiller's schedule ((epoch + 1) / 20 here), one epoch ahead.
    The fusion width is min(512, the student's deepest channels) unless `mid_channels` is given.
    The authors also distill the pooled embedding as a 1x1 stage and use the teacher's pre-ReLU
    maps; kdrun compares the matched maps the runner taps.
    """

    needs_teacher = True
    needs_features = True

    def __init__(self, shapes: FeatureShapes, warmup_epochs: int = 20, mid_channels: Optional[int] = None,
                 warmup_offset: int = 0):
        super().__init__()
        pairs = check_pairs(shapes, "reviewkd")
        mid = int(mid_channels) if mid_channels is not None else min(512, shapes.student_channels[-1])
        if mid < 1:
            raise KdrunError(f"distill.terms.reviewkd.mid_channels={mid_channels} must be >= 1 (or null)")
        self.warmup_epochs = int(warmup_epochs)
        if warmup_offset not in (0, 1):
            raise KdrunError(f"distill.terms.reviewkd.warmup_offset={warmup_offset} must be 0 (the ReviewKD authors' "
                             f"epoch / warmup) or 1 (mdistiller's (epoch + 1) / warmup)")
        self.warmup_offset = int(warmup_offset)
        # Stored shallow to deep like the maps; every stage but the deepest fuses the deeper residual.
        self.abfs = nn.ModuleList(ABF(s, mid, t, fuse=i < pairs - 1)
                                  for i, (s, t) in enumerate(zip(shapes.student_channels, shapes.teacher_channels)))

    def forward(self, ctx: StepContext) -> torch.Tensor:
        pairs = feature_pairs(ctx)
        residual, total = None, 0.0
        for abf, (student, teacher) in zip(reversed(self.abfs), reversed(pairs)):
            output, residual = abf(student, residual, teacher.shape[-2:])
            total = total + hcl(output, teacher)
        return warmup_factor(ctx.epoch, self.warmup_epochs, self.warmup_offset) * total

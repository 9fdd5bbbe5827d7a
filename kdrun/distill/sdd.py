"""SDD (Wei, Luo & Luo, CVPR 2024): KD or DKD on the logits of every region of a multi-scale pooling."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from kdrun.distill.context import StepContext
from kdrun.distill.registry import TERMS
from kdrun.distill.response import binary_log_probs, split_target, warmup_factor
from kdrun.errors import KdrunError

SDD_BASES = ("kd", "dkd")


def region_vectors(final_map: torch.Tensor, scales: Sequence[int]) -> torch.Tensor:
    """(R, B, C) average-pooled vectors of every region, scale by scale, each grid row-major.

    As the authors' code does, the map is pooled once to a fine grid (4 x 4, or the finest scale if finer) and
    every scale is pooled from that one: the same as pooling the map directly when its size is a multiple of
    the grid (8 x 8 CIFAR maps), slightly different otherwise (7 x 7 ImageNet maps).
    """
    finest = max(*scales, 4)
    grid = F.adaptive_avg_pool2d(final_map, finest)
    parts = [grid if s == finest else F.adaptive_avg_pool2d(grid, s) for s in scales]
    return torch.cat([p.flatten(2) for p in parts], dim=2).permute(2, 0, 1)


def region_logits(head, final_map: torch.Tensor, scales: Sequence[int]) -> torch.Tensor:
    """(R, B, K): the model's own head (after its global pooling) on every region's pooled vector."""
    vectors = region_vectors(final_map, scales)
    regions, batch = vectors.shape[:2]
    return head.pooled_head(vectors.reshape(regions * batch, -1)).view(regions, batch, -1)


def _kl_rows(log_p_student: torch.Tensor, log_p_teacher: torch.Tensor) -> torch.Tensor:
    return (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(dim=1)


def kd_rows(student: torch.Tensor, teacher: torch.Tensor, T: float) -> torch.Tensor:
    """T^2 * KL(softmax(t/T) || softmax(s/T)) per row."""
    return _kl_rows(F.log_softmax(student / T, dim=1), F.log_softmax(teacher / T, dim=1)) * (T * T)


def dkd_rows(student: torch.Tensor, teacher: torch.Tensor, targets: torch.Tensor, T: float,
             alpha: float, beta: float) -> torch.Tensor:
    """alpha * TCKD + beta * NCKD per row (DKD, Zhao et al. CVPR 2022; see kdrun.distill.response.dkd_parts)."""
    s_target, s_others = split_target(student / T, targets)
    t_target, t_others = split_target(teacher / T, targets)
    tckd = _kl_rows(binary_log_probs(s_target, s_others), binary_log_probs(t_target, t_others))
    nckd = _kl_rows(F.log_softmax(s_others, dim=1), F.log_softmax(t_others, dim=1))
    return (alpha * tckd + beta * nckd) * (T * T)


@TERMS.register("sdd", family="head")   # reads the final maps through kdrun.models.head
class SDDTerm(nn.Module):
    """Scale decoupled distillation on top of KD or DKD (`base`).

    Wei, Luo & Luo, "Scale Decoupled Distillation", CVPR 2024 (arXiv:2403.13512). Each model's final feature
    map is average-pooled over an s x s grid for every s in `scales` (the 1 x 1 grid is the global pooling),
    and each region goes through the model's own head: R = sum s^2 logit vectors per sample. The base loss
    compares student and teacher region by region. A region is *consistent* when the teacher's prediction
    there and its global prediction are both right or both wrong, *complementary* otherwise; with beta
    `complementary_weight`,
        L_SDD = (sum_consistent l_r,i + beta * sum_complementary l_r,i) / (R * B) = D_con + beta * D_com
    times the warm-up factor (DKD's schedule, see kdrun.distill.response.warmup_factor).
    `base` kd: l = T^2 KL(p_t || p_s); dkd: l = alpha * TCKD + beta * NCKD (DKD's own alpha and beta).
    """

    needs_teacher = True
    needs_head = True   # the step computes final maps and gives the heads (kdrun/models/head.py)

    def __init__(self, base: str = "kd", scales: Sequence[int] = (1, 2, 4), T: float = 4.0,
                 complementary_weight: float = 2.0, alpha: float = 1.0, beta: float = 8.0,
                 warmup_epochs: int = 0, warmup_offset: int = 1):
        super().__init__()
        if base not in SDD_BASES:
            raise KdrunError(f"distill.terms.sdd.base={base!r} is not one of {', '.join(SDD_BASES)}: "
                             f"pass e.g. distill.terms.sdd.base=kd")
        scales = [int(s) for s in scales]
        if 1 not in scales or min(scales) < 1:
            raise KdrunError(f"distill.terms.sdd.scales={scales} must be positive grid sizes including 1 (the "
                             f"global prediction the regions are compared with), e.g. [1,2,4]")
        if T <= 0:
            raise KdrunError(f"distill.terms.sdd.T={T} must be > 0, e.g. 4")
        self.base, self.scales, self.T = base, scales, float(T)
        self.complementary_weight, self.alpha, self.beta = float(complementary_weight), float(alpha), float(beta)
        self.warmup_epochs, self.warmup_offset = int(warmup_epochs), int(warmup_offset)

    def forward(self, ctx: StepContext) -> torch.Tensor:
        if ctx.student_map is None or ctx.teacher_map is None:
            raise KdrunError("the sdd term needs both models' final feature maps, which this trainer did not "
                             "compute: run it through kdrun's distill stage")
        student = region_logits(ctx.student_head, ctx.student_map, self.scales)
        with torch.no_grad():
            teacher = region_logits(ctx.teacher_head, ctx.teacher_map.detach(), self.scales)
        regions, batch, classes = student.shape
        targets = ctx.targets.repeat(regions)
        student, teacher = student.reshape(-1, classes), teacher.reshape(-1, classes)
        if self.base == "kd":
            rows = kd_rows(student, teacher, self.T)
        else:
            rows = dkd_rows(student, teacher, targets, self.T, self.alpha, self.beta)
        right = (teacher.argmax(dim=1) == targets).view(regions, batch)
        global_region = sum(s * s for s in self.scales[: self.scales.index(1)])  # the 1 x 1 grid's row
        global_right = right[global_region]
        weights = torch.where(right == global_right, 1.0, self.complementary_weight).to(rows.dtype)
        loss = (rows * weights.reshape(-1)).sum() / (regions * batch)
        return warmup_factor(ctx.epoch, self.warmup_epochs, self.warmup_offset) * loss

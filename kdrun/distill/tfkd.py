"""Tf-KD_reg (Yuan, Tay, Li, Wang & Feng, CVPR 2020): distillation from a manually designed virtual teacher."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from kdrun.distill.context import StepContext
from kdrun.distill.registry import TERMS
from kdrun.errors import KdrunError


@TERMS.register("tfkd_reg", family="response")
class TfKDRegTerm(nn.Module):
    """Teacher-free KD with a manually designed regularization distribution.

    Yuan et al., "Revisiting Knowledge Distillation via Label Smoothing Regularization", CVPR 2020
    (arXiv:1909.11723), Tf-KD_reg: the virtual teacher puts probability `a` on the label and spreads
    1 - a evenly over the K - 1 other classes,
        p^d(k) = a if k = y, (1 - a) / (K - 1) otherwise,
    softened at temperature T like a teacher's softmax (its logits are log p^d, so p^d_T is proportional to
    (p^d)^(1/T)), and the student learns it through
        L_reg = (1 - alpha) H(y, p) + alpha * D_KL(p^d_T || p_T)
    This term is T^2 * D_KL(p^d_T || softmax(s / T)), averaged over the batch: the T^2 that every KD term of
    kdrun carries (Hinton et al. 2015), so that its gradient does not shrink as T grows; the paper writes the
    KL without it (weight alpha / T^2 follows the paper literally). No teacher network: the term reads the
    labels only, so the distill stage never runs the teacher.
    """

    needs_teacher = False

    def __init__(self, a: float = 0.99, T: float = 20.0):
        super().__init__()
        if not 0.0 < a < 1.0:
            raise KdrunError(f"distill.terms.tfkd_reg.a={a} must be between 0 and 1 (the label's probability "
                             "in the virtual teacher), e.g. 0.99")
        if T <= 0:
            raise KdrunError(f"distill.terms.tfkd_reg.T={T} must be > 0, e.g. 20")
        self.a, self.T = float(a), float(T)

    def virtual_teacher(self, targets: torch.Tensor, num_classes: int, like: torch.Tensor) -> torch.Tensor:
        """p^d softened at T, one row per sample: a softmax of the log-probabilities divided by T."""
        other = math.log((1.0 - self.a) / (num_classes - 1)) / self.T
        logits = torch.full((targets.shape[0], num_classes), other, dtype=like.dtype, device=like.device)
        logits.scatter_(1, targets.view(-1, 1), math.log(self.a) / self.T)
        return F.softmax(logits, dim=1)

    def forward(self, ctx: StepContext) -> torch.Tensor:
        student = ctx.student_logits
        teacher = self.virtual_teacher(ctx.targets, student.shape[1], student)
        log_student = F.log_softmax(student / self.T, dim=1)
        return F.kl_div(log_student, teacher, reduction="batchmean") * self.T ** 2

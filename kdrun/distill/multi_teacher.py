"""Multi-teacher distillation: one soft target from several teachers' outputs.

The target is the mixture sum_i w_i softmax(t_i / T), with weights
  mean:       w_i = 1 / M (You, Xu, Xu & Tao, "Learning from Multiple Teacher Networks", KDD 2017);
  fixed:      the user's weights, normalised to sum 1;
  confidence: per sample, w_i = (1 - softmax_i(CE(t_i, y))) / (M - 1), the teacher weights of CA-MKD
              (Zhang, Chen & Wang, ICASSP 2022): teachers that predict the true class better weigh more.
The term reads StepContext.teacher_group_logits (the teacher is a kdrun.engine.group.ModelGroup).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from kdrun.distill import DistillLoss
from kdrun.distill.context import StepContext
from kdrun.distill.response import CrossEntropyTerm


def teacher_weights(teacher_logits: Sequence[torch.Tensor], targets: Optional[torch.Tensor], weighting: str,
                    weights: Optional[Sequence[float]] = None) -> torch.Tensor:
    """(B, M) weights of the M teachers for each sample; every row sums to 1."""
    count, batch = len(teacher_logits), teacher_logits[0].shape[0]
    device = teacher_logits[0].device
    if weighting == "mean":
        return torch.full((batch, count), 1.0 / count, device=device)
    if weighting == "fixed":
        fixed = torch.tensor([float(w) for w in weights], device=device)
        return (fixed / fixed.sum()).expand(batch, count)
    if weighting == "confidence":
        if count == 1:
            return torch.ones(batch, 1, device=device)
        losses = torch.stack([F.cross_entropy(t.float(), targets, reduction="none") for t in teacher_logits], dim=1)
        return (1.0 - losses.softmax(dim=1)) / (count - 1)
    raise ValueError(f"unknown teacher weighting '{weighting}'")


def mixture_log_probs(teacher_logits: Sequence[torch.Tensor], weights: torch.Tensor, T: float) -> torch.Tensor:
    """log(sum_i w_i softmax(t_i / T)), (B, K), computed in log space (no log(0))."""
    log_probs = torch.stack([F.log_softmax(t.float() / T, dim=1) for t in teacher_logits], dim=1)  # (B, M, K)
    return torch.logsumexp(log_probs + weights.clamp_min(1e-30).log().unsqueeze(2), dim=1)


class MultiTeacherKDTerm(nn.Module):
    """T^2 * KL(mixture of the teachers' softened outputs || softmax(s / T)), averaged over the batch."""

    needs_teacher = True

    def __init__(self, T: float = 4.0, weighting: str = "mean", weights: Optional[Sequence[float]] = None):
        super().__init__()
        self.T, self.weighting = float(T), weighting
        self.fixed_weights = list(weights) if weights is not None else None

    def forward(self, ctx: StepContext) -> torch.Tensor:
        teachers = ctx.teacher_group_logits
        weights = teacher_weights(teachers, ctx.targets, self.weighting, self.fixed_weights)
        target = mixture_log_probs(teachers, weights, self.T)
        student = F.log_softmax(ctx.student_logits / self.T, dim=1)
        return F.kl_div(student, target, reduction="batchmean", log_target=True) * (self.T * self.T)


def multi_teacher_loss(alpha: float, T: float, weighting: str = "mean",
                       weights: Optional[Sequence[float]] = None) -> DistillLoss:
    """(1 - alpha) * CE + alpha * multi-teacher KD, named like kd's terms (ce, kd)."""
    return DistillLoss({"ce": CrossEntropyTerm(), "kd": MultiTeacherKDTerm(T, weighting, weights)},
                       {"ce": 1.0 - alpha, "kd": alpha})

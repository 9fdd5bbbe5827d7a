"""NKD (Yang, Zeng, Li, Zhang, Yuan & Li, ICCV 2023): KD with a normalized non-target loss."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kdrun.distill.context import StepContext
from kdrun.distill.registry import TERMS
from kdrun.errors import KdrunError


@TERMS.register("nkd", family="response")
class NKDTerm(nn.Module):
    """Normalized knowledge distillation.

    Yang et al., "From Knowledge Distillation to Self-Knowledge Distillation: A Unified Approach with
    Normalized Loss and Customized Soft Labels", ICCV 2023 (arXiv:2303.13005): with T and S the
    teacher's and student's softmax at temperature 1, t the label, and N(.) the non-target probabilities
    renormalized to sum to 1 (a softmax over the non-target logits) at temperature lambda (`T` here),
        L_NKD = -T_t log S_t  -  gamma * lambda^2 * sum_{i != t} N(T_i^lambda) log N(S_i^lambda)
    averaged over the batch; the method adds the student's cross-entropy. The target part keeps the
    teacher's confidence as a weight on the student's log-probability of the label; the non-target part
    is a cross-entropy between the normalized non-target distributions, so it no longer shrinks as the
    teacher grows confident (the point of the normalization). A cross-entropy, not a KL divergence: it is
    not zero when the student copies the teacher.
    """

    needs_teacher = True

    def __init__(self, gamma: float = 1.5, T: float = 1.0):
        super().__init__()
        if T <= 0:
            raise KdrunError(f"distill.terms.nkd.T={T} must be > 0, e.g. 1")
        self.gamma, self.T = float(gamma), float(T)

    def forward(self, ctx: StepContext) -> torch.Tensor:
        student, teacher, targets = ctx.student_logits, ctx.teacher_logits.detach(), ctx.targets
        target_column = targets.view(-1, 1)
        log_s_target = F.log_softmax(student, dim=1).gather(1, target_column)
        t_target = F.softmax(teacher, dim=1).gather(1, target_column)
        target_part = -(t_target * log_s_target).mean()
        others = ~F.one_hot(targets, student.shape[1]).bool()
        batch = student.shape[0]
        s_others = student[others].view(batch, -1) / self.T      # row-major: each row keeps its K - 1 others
        t_others = teacher[others].view(batch, -1) / self.T
        non_target = -(F.softmax(t_others, dim=1) * F.log_softmax(s_others, dim=1)).sum(dim=1).mean()
        return target_part + self.gamma * self.T ** 2 * non_target

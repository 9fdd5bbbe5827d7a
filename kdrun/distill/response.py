"""Response-based terms: they compare the student's logits with labels or with the teacher's logits."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kdrun.distill.context import StepContext


def kd_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, T: float) -> torch.Tensor:
    """T^2 * KL(softmax(t/T) || softmax(s/T)), averaged over the batch.

    The T^2 factor keeps the soft-target gradients on the same scale as the hard-label ones when T
    changes (Hinton et al. 2015, section 2).
    """
    log_p_student = F.log_softmax(student_logits / T, dim=1)
    log_p_teacher = F.log_softmax(teacher_logits / T, dim=1)
    return F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True) * (T * T)


class CrossEntropyTerm(nn.Module):
    """Hard-label cross-entropy of the student."""

    needs_teacher = False

    def __init__(self, label_smoothing: float = 0.0):
        super().__init__()
        self.label_smoothing = label_smoothing

    def forward(self, ctx: StepContext) -> torch.Tensor:
        return F.cross_entropy(ctx.student_logits, ctx.targets, label_smoothing=self.label_smoothing)


class KDTerm(nn.Module):
    """Hinton's soft-target term at temperature T."""

    needs_teacher = True

    def __init__(self, T: float = 4.0):
        super().__init__()
        self.T = float(T)

    def forward(self, ctx: StepContext) -> torch.Tensor:
        return kd_divergence(ctx.student_logits, ctx.teacher_logits, self.T)

"""TTM and WTTM (Zheng & Yang, ICLR 2024): a temperature on the teacher only, and sample-adaptive weights."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kdrun.distill.context import StepContext
from kdrun.distill.registry import TERMS
from kdrun.errors import KdrunError


def transformed_teacher_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                           T: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sample (KL(p_t^(1/T) || p_s), U_(1/T)(p_t)): the student at temperature 1, the teacher transformed.

    The power transform p^gamma / sum(p^gamma) of the teacher's probabilities p_t = softmax(z_t) is
    softmax(z_t / T) for gamma = 1/T, computed that way (no power of a tiny probability). Its normalizer
    U = sum_j p_j^gamma = exp(logsumexp(z_t / T) - logsumexp(z_t) / T) is WTTM's sample weight.
    """
    log_p_student = F.log_softmax(student_logits, dim=1)
    log_p_teacher = F.log_softmax(teacher_logits / T, dim=1)
    kl = (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(dim=1)
    power_sum = torch.exp(torch.logsumexp(teacher_logits / T, dim=1) - torch.logsumexp(teacher_logits, dim=1) / T)
    return kl, power_sum


class _TransformedTeacherTerm(nn.Module):
    needs_teacher = True
    weighted = False

    def __init__(self, T: float = 4.0):
        super().__init__()
        if T <= 0:
            raise KdrunError(f"distill.terms.{self.name}.T={T} must be > 0, e.g. 4")
        self.T = float(T)

    def forward(self, ctx: StepContext) -> torch.Tensor:
        kl, power_sum = transformed_teacher_kl(ctx.student_logits, ctx.teacher_logits.detach(), self.T)
        return (power_sum * kl).mean() if self.weighted else kl.mean()


@TERMS.register("ttm", family="response")
class TTMTerm(_TransformedTeacherTerm):
    """Transformed teacher matching.

    Zheng & Yang, "Knowledge Distillation Based on Transformed Teacher Matching", ICLR 2024
    (arXiv:2402.11148): the temperature applies to the teacher only, gamma = 1/T,
        L_TTM = H(y, p_s) + beta * mean_i KL(p_t^gamma(x_i) || p_s(x_i)),  p^gamma = p^gamma / sum_j p_j^gamma
    with p_s the student's softmax at temperature 1 (the config's weight is beta). The paper shows that KD
    with a temperature on both sides equals TTM plus a Renyi-entropy regulariser of the student's output.
    """

    name = "ttm"


@TERMS.register("wttm", family="response")
class WTTMTerm(_TransformedTeacherTerm):
    """Weighted transformed teacher matching: TTM with each sample weighted by the teacher's power sum.

    Zheng & Yang, ICLR 2024:
        L_WTTM = H(y, p_s) + beta * mean_i U_gamma(p_t(x_i)) * KL(p_t^gamma(x_i) || p_s(x_i)),
        U_gamma(p) = sum_j p_j^gamma
    U is larger for a less confident teacher output (1 for a one-hot one), so uncertain samples, which carry
    more of the teacher's dark knowledge, weigh more.
    """

    name = "wttm"
    weighted = True

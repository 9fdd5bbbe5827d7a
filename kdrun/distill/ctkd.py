"""CTKD (Li, Li, Yang, Zhao, Song, Luo, Li & Yang, AAAI 2023): a learnable temperature trained adversarially,
with a curriculum on the adversarial strength."""
from __future__ import annotations

import math

import torch
from torch import nn

from kdrun.distill.context import StepContext
from kdrun.distill.registry import TERMS
from kdrun.distill.response import kd_divergence, logit_pair
from kdrun.errors import KdrunError


class _ReverseGradient(torch.autograd.Function):
    """Identity forward; the gradient multiplied by -strength backward (Ganin & Lempitsky's reversal layer)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, strength: float) -> torch.Tensor:
        ctx.strength = strength
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return -ctx.strength * grad, None


def curriculum_strength(epoch: int, epochs: int, start: float = 0.0, end: float = 1.0) -> float:
    """lambda_n = start + (end - start) / 2 * (1 + cos((1 + min(n, N) / N) * pi)): `start` at epoch 0, rising
    along half a cosine to `end` at epoch N = `epochs` and staying there (CTKD's curriculum)."""
    if epochs <= 0:
        return end
    progress = min(max(epoch, 0), epochs) / epochs
    return start + 0.5 * (end - start) * (1 + math.cos((1 + progress) * math.pi))


@TERMS.register("ctkd", family="response")
class CTKDTerm(nn.Module):
    """KD at a learnable global temperature that the student's optimizer pushes to *raise* the KD loss.

    Li et al., "Curriculum Temperature for Knowledge Distillation", AAAI 2023 (arXiv:2211.16231):
        T = t_start + t_range * sigmoid(theta)          (one learnable theta, the paper's global temperature)
        L = T^2 * KL(softmax(z_t / T) || softmax(z_s / T))
    The student descends L; theta receives -lambda times its gradient (a gradient reversal layer), so it
    ascends L: the temperature makes the task harder as the student learns. lambda follows the curriculum
    of :func:`curriculum_strength`, from 0 at the first epoch to `lambda_max` after `curriculum_epochs`.
    theta is a parameter of the term: the student's optimizer trains it and the checkpoints keep it.
    `T` (for metrics.json) is the temperature's current value.
    """

    needs_teacher = True

    def __init__(self, t_start: float = 1.0, t_range: float = 20.0, init: float = 1.0, lambda_max: float = 1.0,
                 curriculum_epochs: int = 10, logit_standardize: bool = False):
        super().__init__()
        if t_start <= 0 or t_range < 0:
            raise KdrunError(f"distill.terms.ctkd: t_start={t_start} must be > 0 and t_range={t_range} >= 0 "
                             f"(the temperature lies in [t_start, t_start + t_range]), e.g. t_start=1 t_range=20")
        self.t_start, self.t_range = float(t_start), float(t_range)
        self.theta = nn.Parameter(torch.tensor(float(init)))
        self.lambda_max, self.curriculum_epochs = float(lambda_max), int(curriculum_epochs)
        self.logit_standardize = bool(logit_standardize)

    def temperature(self, strength: float = 0.0) -> torch.Tensor:
        theta = _ReverseGradient.apply(self.theta, strength)
        return self.t_start + self.t_range * torch.sigmoid(theta)

    @property
    def T(self) -> float:
        return float(self.temperature().detach())

    def forward(self, ctx: StepContext) -> torch.Tensor:
        strength = curriculum_strength(ctx.epoch, self.curriculum_epochs, 0.0, self.lambda_max)
        T = self.temperature(strength).to(ctx.student_logits.dtype)
        student, teacher = logit_pair(ctx, self.logit_standardize)
        return kd_divergence(student, teacher.detach(), T)

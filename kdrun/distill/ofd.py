"""OFD: pre-ReLU features, a margin from the teacher's BatchNorm, and a partial L2 distance.

Heo, Kim, Yun, Park, Kwak & Choi, "A Comprehensive Overhaul of Feature Distillation", ICCV 2019
(arXiv:1904.01866).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from kdrun.distill.context import FeatureShapes, StepContext
from kdrun.distill.feature_common import at_least_float32, check_pairs, feature_pairs
from kdrun.distill.registry import TERMS


def gaussian_margin(mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Per channel, E[x | x < 0] for x ~ N(mean, std^2) (the paper's Eq. 3):
        m = mean - std * phi(mean / std) / Phi(-mean / std),
    or -3 std where Phi(-mean / std) <= 0.001 (almost no negative responses), as in the authors' code.
    """
    std = std.abs()
    z = -mean / std
    cdf = torch.special.ndtr(z)
    safe = cdf > 0.001
    pdf = torch.exp(-z.pow(2) / 2) / math.sqrt(2 * math.pi)
    return torch.where(safe, mean - std * pdf / torch.where(safe, cdf, torch.ones_like(cdf)), -3 * std)


def partial_l2(student: torch.Tensor, teacher: torch.Tensor, margin: torch.Tensor) -> torch.Tensor:
    """Sum over elements of (s - t')^2 with t' = max(t, m), except where s <= t' <= 0 (the paper's Eq. 5):
    a student response below a negative (ReLU-suppressed) teacher target is not penalized."""
    target = torch.max(teacher, margin)
    mask = (student > target) | (target > 0)
    return ((student - target).pow(2) * mask).sum()


def connector(student_channels: int, teacher_channels: int) -> nn.Sequential:
    """1x1 convolution (no bias) + BatchNorm, initialized as the authors' ``build_feature_connector``."""
    conv = nn.Conv2d(student_channels, teacher_channels, kernel_size=1, bias=False)
    nn.init.normal_(conv.weight, 0.0, math.sqrt(2.0 / teacher_channels))
    return nn.Sequential(conv, nn.BatchNorm2d(teacher_channels))


@TERMS.register("ofd", family="feature")
class OFDTerm(nn.Module):
    """Overhaul of feature distillation on every matched stage:

        L = sum_i 1 / 2^(n-1-i) * 1/B * sum_{b,c,h,w} d_p(r_i(F_s^i), F_t^i; m_i)

    with r_i a 1x1 conv + BN to the teacher's channels, d_p the partial L2 (:func:`partial_l2`) and m_i the
    per-channel margin E[x | x < 0] of the teacher's pre-ReLU responses (:func:`gaussian_margin`). The deepest
    stage weighs 1, each shallower one half the next (the authors' code); the teacher map is average-pooled to
    the student's size where they differ (mdistiller).

    The maps are taken before the ReLU where the model offers them (kdrun's CIFAR ResNets and WRNs,
    kdrun.models.cifar_preact), and the margin then comes from the teacher's BatchNorm in front of that ReLU
    (mean = its bias, std = |its weight|), as in the authors' code. Other models' maps are distilled as tapped
    (a run says so in its log), with the margin from the batch statistics of the teacher's map (the same
    Gaussian, its per-channel mean and standard deviation over batch and positions): on post-ReLU maps the
    teacher is never negative and the margin has no effect, so the loss is the partial L2 alone.
    """

    needs_teacher = True
    needs_features = True
    wants_pre_relu = True

    def __init__(self, shapes: FeatureShapes):
        super().__init__()
        pairs = check_pairs(shapes, "ofd")
        self.connectors = nn.ModuleList(connector(s, t) for s, t in zip(shapes.student_channels,
                                                                        shapes.teacher_channels))
        bns = list(shapes.teacher_bn) or [None] * pairs
        self.from_bn = [bn is not None for bn in bns]
        for i, bn in enumerate(bns):
            margin = gaussian_margin(bn[0].double(), bn[1].double()).float() if bn is not None else torch.zeros(0)
            self.register_buffer(f"margin{i}", margin.view(1, -1, 1, 1) if bn is not None else margin)

    def margin(self, i: int, teacher: torch.Tensor) -> torch.Tensor:
        if self.from_bn[i]:
            return getattr(self, f"margin{i}").to(teacher.dtype)
        mean = teacher.mean(dim=(0, 2, 3))
        std = teacher.std(dim=(0, 2, 3), unbiased=False)
        return gaussian_margin(mean, std).view(1, -1, 1, 1)

    def forward(self, ctx: StepContext) -> torch.Tensor:
        pairs = feature_pairs(ctx)
        total = 0.0
        for i, (student, teacher) in enumerate(pairs):
            # Sums of squares overflow float16 under autocast.
            student, teacher = at_least_float32(self.connectors[i](student)), at_least_float32(teacher)
            if teacher.shape[-2:] != student.shape[-2:]:
                teacher = F.adaptive_avg_pool2d(teacher, student.shape[-2:])
            stage = partial_l2(student, teacher, self.margin(i, teacher)) / student.shape[0]
            total = total + stage / 2 ** (len(pairs) - 1 - i)
        return total

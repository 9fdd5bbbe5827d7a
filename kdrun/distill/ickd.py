"""ICKD: the student's inter-channel correlations match the teacher's.

Liu, Zhou, Yang, Yu, Chen, Han, Ouyang & Xu, "Exploring Inter-Channel Correlation for Diversity-preserved
Knowledge Distillation", ICCV 2021 (arXiv:2202.03680).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from kdrun.distill.context import FeatureShapes, StepContext
from kdrun.distill.feature_common import at_least_float32, check_pairs, conv_bn, feature_pairs
from kdrun.distill.registry import TERMS
from kdrun.errors import KdrunError


def channel_correlation(features: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, C): G = F F^T over the flattened spatial positions, each row L2-normalized."""
    flat = at_least_float32(features.flatten(2))  # float16 Gram sums (autocast) can overflow
    return F.normalize(torch.bmm(flat, flat.transpose(1, 2)), dim=2)


def pick_layer(layer: int, pairs: int, method: str) -> int:
    """`layer` (negative from the deepest) as an index into the matched pairs, or one line naming the range."""
    if not -pairs <= int(layer) < pairs:
        raise KdrunError(f"distill.terms.{method}.layer={layer} is out of range for {pairs} matched feature "
                         f"pair(s): choose within {-pairs}..{pairs - 1}, e.g. layer=-1 for the deepest")
    return int(layer) % pairs


@TERMS.register("ickd", family="feature")
class ICKDTerm(nn.Module):
    """Inter-channel correlation distillation on one matched stage (the deepest by default).

    The student map goes through a 1x1 convolution + BatchNorm to the teacher's channels (the authors'
    ``Embed``); G = F F^T (C x C, over the spatial positions, so the two maps' sizes may differ) with each
    row L2-normalized; the loss is
        L = 1 / (B * C) * sum_b || G_S^b - G_T^b ||_F^2
    as in the authors' code (ICKDLoss.batch_loss), which uses the last map before pooling.
    """

    needs_teacher = True
    needs_features = True

    def __init__(self, shapes: FeatureShapes, layer: Optional[int] = -1):
        super().__init__()
        pairs = check_pairs(shapes, "ickd")
        self.layer = pick_layer(-1 if layer is None else layer, pairs, "ickd")
        self.embed = conv_bn(shapes.student_channels[self.layer], shapes.teacher_channels[self.layer])

    def forward(self, ctx: StepContext) -> torch.Tensor:
        student, teacher = feature_pairs(ctx)[self.layer]
        student = self.embed(student)
        batch, channels = student.shape[:2]
        diff = channel_correlation(student) - channel_correlation(teacher)
        return diff.pow(2).sum() / (channels * batch)

"""FSP (Yim, Joo, Bae & Kim, CVPR 2017): the flow of solution procedure between consecutive feature maps."""
from __future__ import annotations

import torch
from torch import nn

from kdrun.distill.context import FeatureShapes, StepContext
from kdrun.distill.feature_common import (channel_adapters, check_init_phase, check_pairs, feature_pairs,
                                          pool_to_common_size, zero_loss)
from kdrun.distill.registry import TERMS
from kdrun.errors import KdrunError


def fsp_matrices(maps: list[torch.Tensor]) -> list[torch.Tensor]:
    """G(F1, F2)[b, j, i] = sum_{h,w} F1[b, i, h, w] * F2[b, j, h, w] / (h * w) for consecutive maps F1, F2.

    Where two consecutive maps differ in size, the larger is average-pooled to the smaller's (as the authors'
    code and RepDistiller do). Shape (B, C2, C1), the reference code's layout.
    """
    matrices = []
    for bottom, top in zip(maps[:-1], maps[1:]):
        bottom, top = pool_to_common_size(bottom, top)
        matrices.append(torch.einsum("bihw,bjhw->bji", bottom, top) / (bottom.shape[2] * bottom.shape[3]))
    return matrices


@TERMS.register("fsp", family="feature")
class FSPTerm(nn.Module):
    """The student's FSP matrices between consecutive matched maps regress the teacher's.

    Yim et al., "A Gift from Knowledge Distillation: Fast Optimization, Network Minimization and Transfer
    Learning", CVPR 2017, Eq. (1)-(2):
        G_ij = sum_{s,t} F1_{s,t,i} F2_{s,t,j} / (h w),    L_FSP = 1/N sum_x sum_k lambda_k ||G_T^k - G_S^k||_2^2
    As in RepDistiller (Tian et al., ICLR 2020), each matrix contributes the mean squared difference over
    (batch, C2, C1) and the pairs are summed. The paper trains in two stages, FSP first, then the task; so does
    RepDistiller: `init_epochs` (30) epochs of the FSP loss alone (kdrun.engine.init_phase), then the usual
    training with no FSP term (`joint: false`, the term reads 0 there; `joint: true` adds weight * L_FSP).
    FSP matrices need the same widths on both sides: the reference codes refuse other pairs; kdrun puts a
    1x1 conv + BN on the student's maps where the widths differ.
    """

    needs_teacher = True
    needs_features = True
    init_trains_student = True

    def __init__(self, shapes: FeatureShapes, init_epochs: int = 30, joint: bool = False):
        super().__init__()
        pairs = check_pairs(shapes, "fsp")
        if pairs < 2:
            raise KdrunError(f"distill=fsp compares consecutive feature maps but got {pairs} matched pair: name at "
                             f"least two layers on both sides with distill.student_layers / distill.teacher_layers")
        self.init_epochs = check_init_phase("fsp", init_epochs, joint)
        self.joint = bool(joint)
        self.init_lr = None   # the run's lr, constant, as RepDistiller
        self.adapters = channel_adapters(shapes)

    def fsp_loss(self, ctx: StepContext) -> torch.Tensor:
        pairs = feature_pairs(ctx)
        student = fsp_matrices([adapter(s) for adapter, (s, _) in zip(self.adapters, pairs)])
        teacher = fsp_matrices([t for _, t in pairs])
        return sum((s - t).pow(2).mean() for s, t in zip(student, teacher))

    def init_loss(self, ctx: StepContext) -> torch.Tensor:
        return self.fsp_loss(ctx)

    def forward(self, ctx: StepContext) -> torch.Tensor:
        return self.fsp_loss(ctx) if self.joint else zero_loss(ctx)

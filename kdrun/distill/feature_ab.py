"""AB (Heo, Lee, Yun & Choi, AAAI 2019): distillation of the activation boundaries formed by hidden neurons."""
from __future__ import annotations

import torch
from torch import nn

from kdrun.distill.context import FeatureShapes, StepContext
from kdrun.distill.feature import hint_regressor
from kdrun.distill.feature_common import check_init_phase, check_pairs, feature_pairs, zero_loss
from kdrun.distill.registry import TERMS
from kdrun.errors import KdrunError

CONNECTORS = ("always", "auto")


def activation_boundary_loss(student: torch.Tensor, teacher: torch.Tensor, margin: float) -> torch.Tensor:
    """sum of (m - s)^2 where the teacher's neuron is active (t > 0) and s < m (the reference code: s <= m),
    plus (m + s)^2 where it is not (t <= 0) and s > -m: a squared hinge on the connector's output s."""
    active = teacher > 0
    loss = ((student + margin).pow(2) * ((student > -margin) & ~active)
            + (student - margin).pow(2) * ((student <= margin) & active))
    return loss.sum()


@TERMS.register("ab", family="feature")
class ABTerm(nn.Module):
    """The student's connector outputs reproduce on which side of 0 each teacher neuron is.

    Heo et al., "Knowledge Transfer via Distillation of Activation Boundaries Formed by Hidden Neurons",
    AAAI 2019, Eq. (6): L = || rho(T) . sigma(mu 1 - r(S)) + (1 - rho(T)) . sigma(mu 1 + r(S)) ||_2^2
    with rho the step function, sigma the ReLU, mu the margin and r a connector. As in RepDistiller (Tian et
    al., ICLR 2020): stage i of n (shallow to deep) is weighted 2^(i - n + 1), each sum is divided by the batch
    size and scaled by 3/1000, and the stages are summed. The paper and RepDistiller use AB to initialize the
    student: `init_epochs` (30) epochs of this loss alone (connectors and student, kdrun.engine.init_phase),
    then the usual training without it (`joint: false`, the term reads 0 there; `joint: true` adds weight * L).
    The reference codes read pre-activation maps; kdrun taps the stage outputs, which are post-activation
    where the stage ends with a ReLU: the teacher's signs (t > 0) are the same, but an identity connector on
    a post-ReLU student map could never go below -margin, so `connector: always` (default) puts the reference
    codes' ConvReg without ReLU (conv + BN) on every stage; `auto` is the reference codes' choice, identity
    where channels and size agree.
    """

    needs_teacher = True
    needs_features = True
    init_trains_student = True

    def __init__(self, shapes: FeatureShapes, margin: float = 1.0, init_epochs: int = 30, joint: bool = False,
                 connector: str = "always"):
        super().__init__()
        pairs = check_pairs(shapes, "ab")
        if connector not in CONNECTORS:
            raise KdrunError(f"distill.terms.ab.connector={connector!r} is not one of {', '.join(CONNECTORS)}: "
                             f"pass e.g. distill.terms.ab.connector=always")
        if margin < 0:
            raise KdrunError(f"distill.terms.ab.margin={margin} must be >= 0, e.g. distill.terms.ab.margin=1.0")
        self.margin = float(margin)
        self.init_epochs = check_init_phase("ab", init_epochs, joint)
        self.joint = bool(joint)
        self.init_lr = None   # the run's lr, constant, as RepDistiller
        self.stage_weights = [2.0 ** (i - pairs + 1) for i in range(pairs)]
        self.connectors = nn.ModuleList(
            nn.Identity() if connector == "auto" and s == t and tuple(s_size) == tuple(t_size)
            else hint_regressor("conv_bn_relu", s, t, tuple(s_size), tuple(t_size), relu=False)
            for s, t, s_size, t_size in zip(shapes.student_channels, shapes.teacher_channels,
                                            shapes.student_sizes, shapes.teacher_sizes))

    def ab_loss(self, ctx: StepContext) -> torch.Tensor:
        total = 0.0
        for weight, connector, (student, teacher) in zip(self.stage_weights, self.connectors, feature_pairs(ctx)):
            loss = weight * activation_boundary_loss(connector(student), teacher, self.margin)
            total = total + loss / student.shape[0] / 1000 * 3
        return total

    def init_loss(self, ctx: StepContext) -> torch.Tensor:
        return self.ab_loss(ctx)

    def forward(self, ctx: StepContext) -> torch.Tensor:
        return self.ab_loss(ctx) if self.joint else zero_loss(ctx)

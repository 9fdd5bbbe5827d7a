"""ND loss of KD++ / DKD++ (Wang, Wang, Li, Li & Zhang, ICCV 2023): the student's embedding norm and direction."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kdrun.distill.context import FeatureShapes, StepContext
from kdrun.distill.registry import TERMS
from kdrun.errors import KdrunError


@TERMS.register("nd", family="head")   # reads the models' embeddings through kdrun.models.head
class NDTerm(nn.Module):
    """Norm-and-direction loss on the pooled penultimate features.

    Wang et al., "Improving Knowledge Distillation via Regularizing Feature Norm and Direction", ICCV 2023
    (arXiv:2305.17007). With s the student's embedding, t the teacher's, and c_y the teacher's class-mean
    embedding of the sample's label over the training set (computed once before training, teacher in eval mode),
        L_ND = mean_i [ 1 - <s_i, c_y / ||c_y||> / max(||s_i||, ||t_i||) ]
    The projection on the class direction pulls the student's embedding towards the teacher's class center
    (direction) while dividing by the larger of the two norms keeps pushing its norm up (norm).
    When the widths differ, the student's embedding first goes through the authors' projector:
    BatchNorm1d -> Dropout(projector_dropout) -> Linear(student_dim, teacher_dim) (BatchNorm weight 1, bias 0;
    Linear bias 0), trained with the student. A class without training samples has a zero center (loss 1, no gradient).
    """

    needs_teacher = True
    needs_head = True            # the step computes both embeddings (kdrun/models/head.py)
    needs_class_means = True     # the runner hands over the teacher's class centers (set_class_means)

    def __init__(self, shapes: FeatureShapes, projector_dropout: float = 0.5):
        super().__init__()
        if not 0 <= projector_dropout < 1:
            raise KdrunError(f"distill.terms.nd.projector_dropout={projector_dropout} must be in [0, 1), e.g. 0.5")
        if shapes.num_classes < 1 or shapes.teacher_dim < 1:
            raise KdrunError("the nd term needs the number of classes and the teacher's embedding width: build it "
                             "through kdrun's runner, which measures them")
        self.register_buffer("centers", torch.zeros(shapes.num_classes, shapes.teacher_dim))
        self.projector = None
        if shapes.student_dim != shapes.teacher_dim:
            self.projector = nn.Sequential(nn.BatchNorm1d(shapes.student_dim), nn.Dropout(projector_dropout),
                                           nn.Linear(shapes.student_dim, shapes.teacher_dim))
            nn.init.zeros_(self.projector[2].bias)

    def set_class_means(self, means: torch.Tensor) -> None:
        if means.shape != self.centers.shape:
            raise KdrunError(f"the teacher's class means have shape {tuple(means.shape)}, the nd term expects "
                             f"{tuple(self.centers.shape)} (classes x teacher embedding width)")
        self.centers.copy_(means)

    def forward(self, ctx: StepContext) -> torch.Tensor:
        student, teacher = ctx.student_embedding, ctx.teacher_embedding.detach()
        if self.projector is not None:
            student = self.projector(student)
        direction = F.normalize(self.centers[ctx.targets].to(student.dtype), dim=1)  # zero center -> zero
        max_norm = torch.maximum(student.norm(dim=1), teacher.norm(dim=1))
        return (1 - (student * direction).sum(dim=1) / max_norm).mean()

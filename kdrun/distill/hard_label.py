"""Hard-label distillation: the student learns the teacher's predicted class as its target.

Touvron et al., "Training data-efficient image transformers & distillation through attention" (DeiT),
ICML 2021, Eq. 3: loss = 1/2 CE(student, y) + 1/2 CE(student, argmax teacher). The term is CE on the
teacher's labels alone; conf/distill/hard.yaml mixes it with the true labels' CE by alpha. It reads the
teacher's top class only, so it also serves a teacher that answers with labels (teacher.outputs of
kind label, README "Stored teacher outputs").
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kdrun.distill.context import StepContext
from kdrun.distill.registry import TERMS


@TERMS.register("teacher_label", family="response")
class TeacherLabelTerm(nn.Module):
    """CE(student logits, argmax of the teacher's logits)."""

    needs_teacher = True
    reads_teacher_label_only = True   # a label-only stored teacher is enough

    def __init__(self, label_smoothing: float = 0.0):
        super().__init__()
        self.label_smoothing = label_smoothing

    def forward(self, ctx: StepContext) -> torch.Tensor:
        teacher_labels = ctx.teacher_logits.argmax(1)
        return F.cross_entropy(ctx.student_logits, teacher_labels, label_smoothing=self.label_smoothing)

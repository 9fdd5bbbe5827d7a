"""The step's forward for terms that read the models' final maps and heads (kdrun.models.head).

Both models run once through their HeadSplit: logits, final map and embedding, the teacher's without
gradients. Used instead of the feature taps, so a method combines head terms with logit terms, not with
intermediate-feature terms (that would run each model twice per step).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from kdrun.distill.context import FeatureShapes, StepContext
from kdrun.models.features_common import eval_mode


@dataclass
class HeadPairing:
    student: nn.Module      # kdrun.models.head.HeadSplit
    teacher: nn.Module

    def shapes(self, num_classes: int, num_samples: int) -> FeatureShapes:
        """Embedding widths (measured when the splits were built) for terms with learnable parts."""
        return FeatureShapes(student_dim=self.student.embedding_dim, teacher_dim=self.teacher.embedding_dim,
                             num_classes=num_classes, num_samples=num_samples)

    def context(self, images: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor, epoch: int) -> StepContext:
        s_logits, s_map, s_emb = self.student(images)
        with torch.no_grad():
            t_logits, t_map, t_emb = self.teacher(images)
        return StepContext(s_logits, labels, indices, t_logits, epoch, student_embedding=s_emb,
                           teacher_embedding=t_emb, student_map=s_map, teacher_map=t_map,
                           student_head=self.student, teacher_head=self.teacher)


def teacher_class_means(teacher: nn.Module, train_set, num_classes: int, batch_size: int,
                        device: torch.device) -> torch.Tensor:
    """(K, D) mean embedding of the frozen teacher (eval mode) over each class of the training set, in
    float64 sums; a class without samples gets a zero row. `teacher` returns (logits, ..., embedding)
    as a HeadSplit or FeatureTaps does."""
    from kdrun.engine.loaders import Batches

    sums, counts = None, torch.zeros(num_classes, dtype=torch.float64, device=device)
    with torch.no_grad(), eval_mode(teacher):
        for images, labels, _ in Batches(train_set, batch_size, device, shuffle=False):
            embedding = teacher(images)[-1].double()
            if sums is None:
                sums = torch.zeros(num_classes, embedding.shape[1], dtype=torch.float64, device=device)
            sums.index_add_(0, labels, embedding)
            counts += torch.bincount(labels, minlength=num_classes).double()
    if sums is None:  # an empty training set (the preflight refuses it before this runs)
        sums = torch.zeros(num_classes, teacher.embedding_dim, dtype=torch.float64, device=device)
    return (sums / counts.clamp_min(1).unsqueeze(1)).float()

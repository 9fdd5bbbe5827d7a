"""The forward passes of one training step, producing what the loss terms read (a StepContext).

Three cases, cheapest first: the student alone (teacher and baseline stages, alpha=0), student and
teacher logits (response-based methods), and intermediate features of both (feature and relation
methods). Features are computed only when a term asks for them, in the same pass as the logits.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

from kdrun.distill.context import FeatureShapes, StepContext
from kdrun.engine.group import ModelGroup, ensemble_logits
from kdrun.errors import KdrunError


@dataclass
class FeaturePairing:
    """Feature taps of both models and which of their maps are compared (student i <-> teacher i)."""
    student: nn.Module          # kdrun.models.features.FeatureTaps
    teacher: nn.Module
    student_index: list[int]
    teacher_index: list[int]
    teacher_classifier: Optional[nn.Module] = None   # kdrun.models.features_classifier, for terms that ask

    def shapes(self, input_shape: tuple[int, int, int], num_classes: int, num_samples: int) -> FeatureShapes:
        """Measure the matched maps with one dummy batch (before the optimizer exists)."""
        dummy = torch.zeros(2, *input_shape, device=_device_of(self.student))
        student_was_training = self.student.training
        self.student.eval()  # a probe must not move BatchNorm statistics
        self.teacher.eval()  # and the teacher stays frozen for good
        with torch.no_grad():
            _, s_maps, s_emb = self.student(dummy)
            _, t_maps, t_emb = self.teacher(dummy)
        self.student.train(student_was_training)
        s_maps = [s_maps[i] for i in self.student_index]
        t_maps = [t_maps[i] for i in self.teacher_index]
        bns = self.teacher.bn_before_relu()
        teacher_bn = [None if bns is None else (bns[i].bias.detach().clone(), bns[i].weight.detach().clone())
                      for i in self.teacher_index]
        return FeatureShapes(teacher_bn=teacher_bn,
            student_channels=[m.shape[1] for m in s_maps], teacher_channels=[m.shape[1] for m in t_maps],
            student_sizes=[tuple(m.shape[2:]) for m in s_maps], teacher_sizes=[tuple(m.shape[2:]) for m in t_maps],
            student_dim=s_emb.shape[1], teacher_dim=t_emb.shape[1], num_classes=num_classes, num_samples=num_samples)


def _logits(output) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def _device_of(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


class StepForward:
    """Runs the models for one batch and packs their outputs for the loss."""

    def __init__(self, student: nn.Module, teacher: Optional[nn.Module] = None,
                 features: Optional[FeaturePairing] = None, teacher_outputs=None,
                 strong_view: Optional[Callable[[torch.Tensor], torch.Tensor]] = None, heads=None):
        self.student, self.teacher, self.features = student, teacher, features
        # kdrun.engine.head_forward.HeadPairing: when set, both models run through their HeadSplit.
        self.heads = heads
        # kdrun.engine.teacher_cache.TeacherOutputs: when set, the teacher's outputs are read, not computed.
        self.teacher_outputs = teacher_outputs
        # kdrun.data.strong_view.StrongView: when set, both models also see a strong view of each batch.
        self.strong_view = strong_view
        if strong_view is not None and (teacher_outputs is not None or teacher is None
                                        or isinstance(teacher, ModelGroup) or isinstance(student, ModelGroup)):
            raise KdrunError("mlkd's prediction augmentation needs one live teacher and one student (not "
                             "teacher.cache, several teachers or peers): pass distill.terms.mlkd.augment=false")

    @property
    def has_teacher(self) -> bool:
        return self.teacher is not None or self.teacher_outputs is not None

    def prepare_teacher(self, device: torch.device, speed) -> None:
        """The live teacher on the device, frozen, in the run's precision and memory layout."""
        if self.teacher is None:
            return
        self.teacher.to(device).eval().requires_grad_(False)
        if self.teacher_outputs is None:  # with cached outputs the model never runs in a step
            speed.prepare(self.features.teacher if self.features is not None else self.teacher)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor, epoch: int) -> StepContext:
        ctx = self._weak(images, labels, indices, epoch)
        if self.strong_view is not None:
            strong = self.strong_view(images)
            student, teacher = self.student, self.teacher
            if self.features is not None:  # the taps wrap the models and return (logits, maps, embedding)
                student, teacher = self.features.student, self.features.teacher
            with torch.no_grad():
                ctx.teacher_logits_strong = _logits(teacher(strong))
            ctx.student_logits_strong = _logits(student(strong))
        return ctx

    def _weak(self, images: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor, epoch: int) -> StepContext:
        if self.features is not None:
            return self._with_features(images, labels, indices, epoch)
        if self.heads is not None:
            return self.heads.context(images, labels, indices, epoch)
        teacher_logits = teacher_group = peers = None
        if self.teacher_outputs is not None:
            teacher_logits = self.teacher_outputs.logits_for(indices)
        elif isinstance(self.teacher, ModelGroup):
            with torch.no_grad():
                teacher_group = self.teacher.member_logits(images)
        elif self.teacher is not None:
            with torch.no_grad():
                teacher_logits = self.teacher(images)
        if isinstance(self.student, ModelGroup):
            peers = self.student.member_logits(images)  # each peer's own logits, for its own loss
            student_logits = ensemble_logits([p.detach() for p in peers])  # what train_top1 counts
        else:
            student_logits = self.student(images)
        distill_logits = None
        if isinstance(student_logits, tuple):  # a distillation token's two heads: (class, distillation)
            student_logits, distill_logits = student_logits
        return StepContext(student_logits, labels, indices, teacher_logits, epoch, peer_logits=peers,
                           teacher_group_logits=teacher_group, student_distill_logits=distill_logits)

    def _with_features(self, images, labels, indices, epoch) -> StepContext:
        pairing = self.features
        logits, s_maps, s_emb = pairing.student(images)
        if self.teacher_outputs is not None:
            t_logits, t_matched, t_emb = self.teacher_outputs.features_for(indices)
        else:
            with torch.no_grad():
                t_logits, t_maps, t_emb = pairing.teacher(images)
            t_matched = [t_maps[i] for i in pairing.teacher_index]
        return StepContext(
            logits, labels, indices, t_logits, epoch,
            student_features=[s_maps[i] for i in pairing.student_index],
            teacher_features=t_matched,
            student_embedding=s_emb, teacher_embedding=t_emb, teacher_classifier=pairing.teacher_classifier)

"""DeiT's distillation token (Touvron, Cord, Douze, Massa, Sablayrolles & Jegou, ICML 2021, arXiv:2012.12877).

A vision transformer with a second, distillation token has two heads: the class head learns the labels (the
method's `ce` term) and the distillation head learns the teacher (this term); at test time the prediction is
the average of both heads' logits. timm's `*_distilled_*` models (VisionTransformerDistilled) are built that
way: in eval mode they return the average; after `set_distilled_training(True)`, in train mode, both heads.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kdrun.distill.context import StepContext
from kdrun.distill.registry import TERMS
from kdrun.errors import KdrunError

MODES = ("hard", "soft")
REDUCTIONS = ("elements", "batch")


def no_token_message(model: nn.Module) -> str:
    return (f"distill=deit needs a student with a distillation token and this one ({type(model).__name__}) has "
            "none: use a timm *_distilled_* model, e.g. student.name=deit_tiny_distilled_patch16_224")


def enable_distill_token(model: nn.Module) -> None:
    """Make the student return (class logits, distillation logits) in train mode, or refuse it in one line."""
    if not callable(getattr(model, "set_distilled_training", None)) or not hasattr(model, "head_dist"):
        raise KdrunError(no_token_message(model))
    model.set_distilled_training(True)


def needs_distill_token(loss: nn.Module) -> bool:
    """Whether any term of a kdrun.distill.DistillLoss reads the distillation head."""
    return any(getattr(term, "needs_distill_token", False) for term in loss.terms.values())


@TERMS.register("deit", family="response")
class DeiTTerm(nn.Module):
    """The distillation head's loss, with Z_d its logits and Z_t the teacher's (the paper's Eq. 2 and 3):
        hard: CE(Z_d, argmax_c Z_t)                       (the paper's default and best)
        soft: T^2 * KL(softmax(Z_t / T) || softmax(Z_d / T))
    The authors' code sums the soft KL over the batch and divides by the number of logits, B * K
    (reduction=elements, the default); reduction=batch divides by B (timm's TokenDistillationTask)."""

    needs_teacher = True
    needs_distill_token = True

    def __init__(self, mode: str = "hard", T: float = 1.0, reduction: str = "elements"):
        super().__init__()
        if mode not in MODES:
            raise KdrunError(f"distill.terms.deit.mode={mode} must be hard or soft, e.g. distill.terms.deit.mode=soft")
        if T <= 0:
            raise KdrunError(f"distill.terms.deit.T={T} must be > 0, e.g. 1")
        if reduction not in REDUCTIONS:
            raise KdrunError(f"distill.terms.deit.reduction={reduction} must be elements or batch")
        self.mode, self.T, self.reduction = mode, float(T), reduction

    def forward(self, ctx: StepContext) -> torch.Tensor:
        student, teacher = ctx.student_distill_logits, ctx.teacher_logits.detach()
        if student is None:
            raise KdrunError("distill=deit: the student returned one head, not its class and distillation heads: "
                             "train a timm *_distilled_* student (e.g. student.name=deit_tiny_distilled_patch16_224) "
                             "with paradigm=offline and no feature terms")
        if self.mode == "hard":
            return F.cross_entropy(student, teacher.argmax(dim=1))
        T = self.T
        kl = F.kl_div(F.log_softmax(student / T, dim=1), F.log_softmax(teacher / T, dim=1), reduction="sum",
                      log_target=True)
        return kl * (T * T) / (student.numel() if self.reduction == "elements" else student.shape[0])

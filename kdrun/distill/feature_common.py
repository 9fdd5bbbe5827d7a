"""Helpers shared by the feature-based terms: checking the matched pairs, resizing, channel adapters."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from kdrun.distill.context import FeatureShapes, StepContext
from kdrun.errors import KdrunError


def check_pairs(shapes: FeatureShapes, method: str) -> int:
    """Number of matched (student, teacher) maps; a one-line error when there are none or they disagree."""
    counts = {len(shapes.student_channels), len(shapes.teacher_channels)}
    if len(counts) != 1 or 0 in counts:
        raise KdrunError(f"distill={method} needs matched feature maps, got {len(shapes.student_channels)} student "
                         f"and {len(shapes.teacher_channels)} teacher maps; name as many layers on both sides "
                         f"with distill.student_layers / distill.teacher_layers")
    return counts.pop()


def feature_pairs(ctx: StepContext) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(student map, teacher map) pairs of the step, the teacher's detached (it never gets gradients)."""
    if ctx.student_features is None or ctx.teacher_features is None:
        raise KdrunError("a feature distillation term got no feature maps; build the loss through kdrun's runner")
    return [(s, t.detach()) for s, t in zip(ctx.student_features, ctx.teacher_features)]


def resize_to(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Resize a (B, C, H, W) map to `size`: adaptive average pooling to shrink, bilinear to enlarge.

    When one side shrinks and the other grows, pool first along both, then interpolate up.
    """
    size = (int(size[0]), int(size[1]))
    height, width = x.shape[-2:]
    if (height, width) == size:
        return x
    if height > size[0] or width > size[1]:
        x = F.adaptive_avg_pool2d(x, (min(height, size[0]), min(width, size[1])))
    if tuple(x.shape[-2:]) != size:
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    return x


def pool_to_common_size(student: torch.Tensor, teacher: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both maps at the smaller of their sizes: the larger one is average-pooled down, never upsampled.

    This is what the authors' codes of AT, NST and VID (and RepDistiller's) do: where the student map is
    smaller, the teacher's is pooled to it rather than the student's enlarged. Height and width are
    taken separately (each to its minimum).
    """
    size = (min(student.shape[-2], teacher.shape[-2]), min(student.shape[-1], teacher.shape[-1]))
    if tuple(student.shape[-2:]) != size:
        student = F.adaptive_avg_pool2d(student, size)
    if tuple(teacher.shape[-2:]) != size:
        teacher = F.adaptive_avg_pool2d(teacher, size)
    return student, teacher


def conv_bn(in_channels: int, out_channels: int) -> nn.Sequential:
    """1x1 convolution + BatchNorm: the learnable map from student to teacher channels."""
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False),
                         nn.BatchNorm2d(out_channels))


def channel_adapters(shapes: FeatureShapes) -> nn.ModuleList:
    """Per matched pair, a 1x1 conv + BN from the student's to the teacher's channels, or identity where they agree.

    For the terms whose reference codes compare per-network matrices (FSP, KDSVD) and refuse pairs of different
    widths: with equal widths nothing is added, as there.
    """
    return nn.ModuleList(nn.Identity() if s == t else conv_bn(s, t)
                         for s, t in zip(shapes.student_channels, shapes.teacher_channels))


def check_init_phase(method: str, init_epochs: int, joint: bool) -> int:
    """`init_epochs` of a term with an initialization phase (kdrun.engine.init_phase), checked."""
    if isinstance(init_epochs, bool) or not isinstance(init_epochs, int) or init_epochs < 0:
        raise KdrunError(f"distill.terms.{method}.init_epochs={init_epochs!r} must be a whole number >= 0, "
                         f"e.g. distill.terms.{method}.init_epochs=30")
    if init_epochs == 0 and not joint:
        raise KdrunError(f"distill.terms.{method} with init_epochs=0 and joint=false never applies its loss: "
                         f"pass distill.terms.{method}.init_epochs=30 or distill.terms.{method}.joint=true")
    return init_epochs


def zero_loss(ctx: StepContext) -> torch.Tensor:
    """The value of a term that does not take part in the main training (logged as 0)."""
    return ctx.student_logits.new_zeros(())


def at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """float16/bfloat16 (autocast) as float32, for sums that would overflow or lose precision; wider as is."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x

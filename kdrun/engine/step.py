"""One training step's forward passes and loss as one module: what DDP wraps in a torchrun launch.

Its submodules are exactly the trainable parts (the student, or its feature taps, and the loss
with its adapters), so DDP synchronises their gradients and nothing else. The teacher is reached
through the StepForward, a plain attribute, so it is neither broadcast nor synchronised.
"""
from __future__ import annotations

import torch
from torch import nn

from kdrun.distill import DistillLoss
from kdrun.engine.forward import StepForward
from kdrun.engine.precision import Speed


class TrainStep(nn.Module):
    def __init__(self, step_forward: StepForward, loss: DistillLoss, speed: Speed):
        super().__init__()
        features = step_forward.features
        self.student = features.student if features is not None else step_forward.student
        self.loss = loss
        self.step_forward = step_forward   # not an nn.Module: not registered
        self.speed = speed

    def forward(self, images: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor,
                epoch: int) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
        ctx = self.step_forward(self.speed.inputs(images), labels, indices, epoch)
        total, parts = self.loss(ctx)
        return total, parts, ctx.student_logits

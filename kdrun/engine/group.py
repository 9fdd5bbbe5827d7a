"""Several models trained or consulted as one: the peers of online distillation, the teachers of
multi-teacher distillation.

The training step (kdrun.engine.forward.StepForward) runs every member and hands each member's logits
to the loss (StepContext.peer_logits / teacher_group_logits); everything else (evaluation, checkpoints,
the optimizer) sees one module whose output is the members' ensemble.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def ensemble_logits(logits: Sequence[torch.Tensor]) -> torch.Tensor:
    """log(mean_k softmax(z_k)): logits whose softmax is the members' mean prediction."""
    log_probs = torch.stack([F.log_softmax(z.float(), dim=1) for z in logits])
    return torch.logsumexp(log_probs, dim=0) - math.log(len(logits))


class ModelGroup(nn.Module):
    def __init__(self, members: Sequence[nn.Module]):
        super().__init__()
        self.members = nn.ModuleList(members)

    def member_logits(self, images: torch.Tensor) -> list[torch.Tensor]:
        return [member(images) for member in self.members]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return ensemble_logits(self.member_logits(images))

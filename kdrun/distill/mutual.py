"""Deep mutual learning (Zhang, Xiang, Hospedales & Lu, CVPR 2018): the loss terms of a cohort of peers.

They read StepContext.peer_logits (the student is a kdrun.engine.group.ModelGroup). Peer k's loss is
    CE(z_k, y) + kl_weight / (N - 1) * sum_{l != k} T^2 * KL(softmax(z_l / T) || softmax(z_k / T))
with the other peers' logits detached: they are targets, as in the paper's alternating updates, so the
sum of all peers' losses gives every peer exactly the gradient of its own loss.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kdrun.distill import DistillLoss
from kdrun.distill.context import StepContext
from kdrun.distill.response import kd_divergence


class PeerCrossEntropyTerm(nn.Module):
    """Hard-label cross-entropy of peer `index`."""

    needs_teacher = False

    def __init__(self, index: int):
        super().__init__()
        self.index = index

    def forward(self, ctx: StepContext) -> torch.Tensor:
        return F.cross_entropy(ctx.peer_logits[self.index], ctx.targets)


class MutualKLTerm(nn.Module):
    """Mean over the other peers l of T^2 * KL(p_l || p_index), the others' predictions held fixed."""

    needs_teacher = False

    def __init__(self, index: int, T: float = 1.0):
        super().__init__()
        self.index, self.T = index, float(T)

    def forward(self, ctx: StepContext) -> torch.Tensor:
        mine = ctx.peer_logits[self.index]
        others = [z.detach() for i, z in enumerate(ctx.peer_logits) if i != self.index]
        return sum(kd_divergence(mine, other, self.T) for other in others) / len(others)


def mutual_learning_loss(num_peers: int, T: float = 1.0, kl_weight: float = 1.0) -> DistillLoss:
    """Every peer's CE and mutual KL as named terms (peer0_ce, peer0_kl, peer1_ce, ...), summed."""
    terms, weights = {}, {}
    for k in range(num_peers):
        terms[f"peer{k}_ce"], weights[f"peer{k}_ce"] = PeerCrossEntropyTerm(k), 1.0
        terms[f"peer{k}_kl"], weights[f"peer{k}_kl"] = MutualKLTerm(k, T), kl_weight
    return DistillLoss(terms, weights)

"""Helpers shared by the relation-based terms (kdrun.distill.relation, kdrun.distill.relation_crd)."""
from __future__ import annotations

import torch

from kdrun.distill.context import StepContext
from kdrun.errors import KdrunError


def embedding_pair(ctx: StepContext, method: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(student, teacher) pooled embeddings of the step as (B, D) rows, the teacher's detached."""
    if ctx.student_embedding is None or ctx.teacher_embedding is None:
        raise KdrunError(f"distill={method} got no embeddings; build the loss through kdrun's runner, which "
                         f"computes them for terms that set needs_features")
    # Detached defensively: the teacher never gets gradients, even if a caller forgot no_grad.
    return ctx.student_embedding.flatten(1), ctx.teacher_embedding.detach().flatten(1)

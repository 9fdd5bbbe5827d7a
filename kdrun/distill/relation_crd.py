"""CRD (Tian, Krishnan & Isola, ICLR 2020): contrastive representation distillation with memory banks."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kdrun.distill.context import FeatureShapes, StepContext
from kdrun.distill.relation_common import embedding_pair
from kdrun.errors import KdrunError


def random_unit_rows(rows: int, dim: int) -> torch.Tensor:
    """(rows, dim) rows drawn uniformly on the unit sphere: the memory before any sample was seen."""
    return F.normalize(torch.randn(rows, dim), p=2, dim=1)


class CRDTerm(nn.Module):
    """Contrastive representation distillation: the student's embedding of a sample must pick the
    teacher's embedding of the same sample out of nce_k embeddings of other samples, and vice versa.

    Tian, Krishnan & Isola, "Contrastive Representation Distillation", ICLR 2020 (section 3): with
    g^S, g^T linear maps to `feat_dim` followed by L2 normalization, the critic
    h(t, s) = exp(g^T(t)'g^S(s) / tau) scores the positive pair (same sample) against N negatives
    drawn from a memory bank of embeddings computed in earlier steps.

    Variant: the softmax (InfoNCE) form of the bound, a (1 + nce_k)-way cross-entropy at temperature
    `nce_t` = 0.07,
        L = -log [ exp(z_i'm_i / tau) / (exp(z_i'm_i / tau) + sum_{k=1..K} exp(z_i'm_{n_k} / tau)) ],
    instead of the paper's NCE loss with a normalization constant Z estimated on the first batch:
    same critic and memory, no Z to estimate, numerically safer. As in the authors' code the loss is
    symmetric: the student anchor against the teacher memory (trains the student and g^S) plus the
    teacher anchor against the student memory (trains g^T; the teacher network itself is frozen).

    Memory: one (num_samples, feat_dim) bank per side, registered as buffers (saved in checkpoints),
    row i updated after each training-mode forward as normalize(momentum * m_i + (1 - momentum) * z_i)
    (momentum 0.5). Negatives are drawn uniformly with replacement among the *other* samples
    (the authors' CIFAR code draws them from other classes), nce_k clamped to num_samples - 1.
    Cost: the memory takes 2 * num_samples * feat_dim floats, and each step gathers a
    (B, 1 + nce_k, feat_dim) block per side.
    """

    needs_teacher = True
    needs_features = True

    def __init__(self, shapes: FeatureShapes, feat_dim: int = 128, nce_k: int = 16384, nce_t: float = 0.07,
                 momentum: float = 0.5):
        super().__init__()
        if shapes.num_samples < 2:
            raise KdrunError(f"distill=crd needs a training set of at least 2 samples for its memory bank, got "
                             f"num_samples={shapes.num_samples}; build the loss through kdrun's runner")
        if shapes.student_dim <= 0 or shapes.teacher_dim <= 0:
            raise KdrunError("distill=crd needs the embedding widths (FeatureShapes.student_dim / teacher_dim); "
                             "build the loss through kdrun's runner, which measures them")
        if int(feat_dim) < 1 or int(nce_k) < 1 or float(nce_t) <= 0 or not 0.0 <= float(momentum) < 1.0:
            raise KdrunError(f"distill.terms.crd: feat_dim={feat_dim} and nce_k={nce_k} must be >= 1, nce_t={nce_t} "
                             f"> 0 and momentum={momentum} within [0, 1), e.g. 128, 16384, 0.07, 0.5")
        self.num_samples = int(shapes.num_samples)
        self.nce_k = min(int(nce_k), self.num_samples - 1)     # small datasets have fewer other samples
        self.nce_t, self.momentum = float(nce_t), float(momentum)
        self.embed_student = nn.Linear(shapes.student_dim, int(feat_dim))
        self.embed_teacher = nn.Linear(shapes.teacher_dim, int(feat_dim))
        self.register_buffer("memory_student", random_unit_rows(self.num_samples, int(feat_dim)))
        self.register_buffer("memory_teacher", random_unit_rows(self.num_samples, int(feat_dim)))

    def sample_contrast(self, indices: torch.Tensor) -> torch.Tensor:
        """(B, 1 + nce_k) memory rows: the sample itself first, then nce_k others drawn uniformly."""
        others = torch.randint(0, self.num_samples - 1, (indices.shape[0], self.nce_k), device=indices.device)
        others = others + (others >= indices.unsqueeze(1)).long()   # skip the positive: uniform over the rest
        return torch.cat([indices.unsqueeze(1), others], dim=1)

    def contrast_loss(self, anchor: torch.Tensor, memory: torch.Tensor, contrast: torch.Tensor) -> torch.Tensor:
        """Softmax cross-entropy of each anchor over its (1 + nce_k) memory rows, the positive at column 0."""
        batch, candidates = contrast.shape
        rows = memory.index_select(0, contrast.reshape(-1)).view(batch, candidates, -1).to(anchor.dtype)
        logits = torch.bmm(rows, anchor.unsqueeze(2)).squeeze(2) / self.nce_t
        return F.cross_entropy(logits, torch.zeros(batch, dtype=torch.long, device=anchor.device))

    @torch.no_grad()
    def update_memory(self, memory: torch.Tensor, indices: torch.Tensor, embedding: torch.Tensor) -> None:
        mixed = self.momentum * memory.index_select(0, indices) + (1.0 - self.momentum) * embedding.to(memory.dtype)
        memory.index_copy_(0, indices, F.normalize(mixed, p=2, dim=1))

    def forward(self, ctx: StepContext) -> torch.Tensor:
        if ctx.indices is None:
            raise KdrunError("crd needs sample indices from the dataset (StepContext.indices, the positions of the "
                             "batch's samples in the training set); build the loss through kdrun's runner")
        student, teacher = embedding_pair(ctx, "crd")
        z_student = F.normalize(self.embed_student(student), p=2, dim=1)
        z_teacher = F.normalize(self.embed_teacher(teacher), p=2, dim=1)
        indices = ctx.indices.to(device=self.memory_student.device, dtype=torch.long).flatten()
        contrast = self.sample_contrast(indices)
        # Both losses read the memory as it was before this batch; the update comes after.
        loss = (self.contrast_loss(z_student, self.memory_teacher, contrast)
                + self.contrast_loss(z_teacher, self.memory_student, contrast))
        if self.training:
            self.update_memory(self.memory_student, indices, z_student.detach())
            self.update_memory(self.memory_teacher, indices, z_teacher.detach())
        return loss

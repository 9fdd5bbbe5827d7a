"""Relation-based terms: the student matches how the teacher relates the samples of a batch to each other.

RKD, PKT, CC and CRD compare the pooled penultimate embeddings (``ctx.student_embedding`` /
``ctx.teacher_embedding``, (B, D)); SP compares batch similarity matrices of intermediate feature maps.
Relations are B x B (or B x B x B) objects, so the student's and the teacher's widths need not agree.
Every term sets ``needs_features`` so that the runner computes embeddings and maps; the teacher's are
detached in every term and its relations are computed without autograd.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from kdrun.distill.context import FeatureShapes, StepContext
from kdrun.distill.feature_common import check_pairs, feature_pairs
from kdrun.distill.registry import TERMS
from kdrun.errors import KdrunError


def embedding_pair(ctx: StepContext, method: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(student, teacher) pooled embeddings of the step as (B, D) rows, the teacher's detached."""
    if ctx.student_embedding is None or ctx.teacher_embedding is None:
        raise KdrunError(f"distill={method} got no embeddings; build the loss through kdrun's runner, which "
                         f"computes them for terms that set needs_features")
    # Detached defensively: the teacher never gets gradients, even if a caller forgot no_grad.
    return ctx.student_embedding.flatten(1), ctx.teacher_embedding.detach().flatten(1)


# --- RKD (Park, Kim, Lu & Cho, CVPR 2019) -------------------------------------------------------------

def normalized_distances(e: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """psi_D: the (B, B) Euclidean distances divided by their mean over the pairs at positive distance.

    Distances come from explicit differences rather than the Gram-matrix identity, which loses
    precision for nearby points in float32; the norm's gradient at a zero difference is 0, not NaN.
    """
    distances = (e.unsqueeze(0) - e.unsqueeze(1)).norm(dim=2)
    positive = (distances > 0).sum().clamp(min=1)           # the diagonal (and duplicate samples) is 0
    mean = (distances.sum() / positive).clamp(min=eps)      # a batch of one sample: all zeros, no NaN
    return distances / mean


def triplet_angles(e: torch.Tensor) -> torch.Tensor:
    """psi_A: (B, B, B) with [j, i, k] = cos of the angle at e_j between e_i and e_k.

    Degenerate triplets (i == j or k == j) give a zero unit vector, hence a cosine of 0 on both sides.
    """
    units = F.normalize(e.unsqueeze(0) - e.unsqueeze(1), p=2, dim=2)   # units[j, i] = unit(e_i - e_j)
    return torch.bmm(units, units.transpose(1, 2))


def rkd_parts(student: torch.Tensor, teacher: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(distance-wise, angle-wise) RKD losses: Huber (smooth L1, delta 1) averaged over all pairs / triplets."""
    with torch.no_grad():
        t_distances, t_angles = normalized_distances(teacher), triplet_angles(teacher)
    distance = F.smooth_l1_loss(normalized_distances(student), t_distances)
    angle = F.smooth_l1_loss(triplet_angles(student), t_angles)
    return distance, angle


@TERMS.register("rkd", family="relation")
class RKDTerm(nn.Module):
    """Relational knowledge distillation: distance- and angle-wise relations of the embeddings.

    Park, Kim, Lu & Cho, "Relational Knowledge Distillation", CVPR 2019 (arXiv:1904.05068), the
    distance-wise and angle-wise losses:
        psi_D(t_i, t_j) = ||t_i - t_j||_2 / mu,  mu = mean of ||t_i - t_j||_2 over the pairs with i != j
        psi_A(t_i, t_j, t_k) = <e_ij, e_kj>,     e_ij = (t_i - t_j) / ||t_i - t_j||_2
        L = distance_weight * sum_(i, j) l_delta(psi_D^T, psi_D^S)
            + angle_weight * sum_(i, j, k) l_delta(psi_A^T, psi_A^S)
    with l_delta the Huber loss (delta = 1). As in the authors' code, the Huber losses are *averaged*
    over all B^2 pairs and B^3 triplets (degenerate ones contribute 0), and the defaults are the
    paper's lambda_D = 25, lambda_A = 50. No learnable parts: the widths may differ.
    """

    needs_teacher = True
    needs_features = True

    def __init__(self, distance_weight: float = 25.0, angle_weight: float = 50.0):
        super().__init__()
        self.distance_weight, self.angle_weight = float(distance_weight), float(angle_weight)

    def forward(self, ctx: StepContext) -> torch.Tensor:
        distance, angle = rkd_parts(*embedding_pair(ctx, "rkd"))
        return self.distance_weight * distance + self.angle_weight * angle


# --- PKT (Passalis & Tefas, ECCV 2018) ----------------------------------------------------------------

def cosine_conditional_probabilities(e: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """(B, B) with row i the distribution p_{j|i} = K(e_i, e_j) / sum_j' K(e_i, e_j'), K = (cos + 1) / 2."""
    e = F.normalize(e, p=2, dim=1, eps=eps)
    kernel = (e @ e.t() + 1.0) / 2.0
    return kernel / kernel.sum(dim=1, keepdim=True)


@TERMS.register("pkt", family="relation")
class PKTTerm(nn.Module):
    """Probabilistic knowledge transfer: match the cosine-kernel conditional distributions of the batch.

    Passalis & Tefas, "Learning Deep Representations with Probabilistic Knowledge Transfer", ECCV 2018
    (arXiv:1803.10837), with the cosine similarity kernel:
        K(a, b) = (a'b / (||a|| ||b||) + 1) / 2,   p_{j|i} = K(x_i, x_j) / sum_k K(x_i, x_k)
        L = sum_i sum_j p^T_{j|i} log(p^T_{j|i} / p^S_{j|i})      (KL(teacher || student) per row)
    As in the authors' code and RepDistiller (whose weight 30000 the config uses), the sums run over
    j == i too (the paper leaves the diagonal out), the B^2 terms are averaged rather than summed, and
    eps = 1e-7 is added inside the log ratio.
    """

    needs_teacher = True
    needs_features = True

    def __init__(self, eps: float = 1e-7):
        super().__init__()
        self.eps = float(eps)

    def forward(self, ctx: StepContext) -> torch.Tensor:
        student, teacher = embedding_pair(ctx, "pkt")
        with torch.no_grad():
            p_teacher = cosine_conditional_probabilities(teacher, self.eps)
        p_student = cosine_conditional_probabilities(student, self.eps)
        return (p_teacher * torch.log((p_teacher + self.eps) / (p_student + self.eps))).mean()


# --- CC (Peng, Jin, Liu, Zhou, Wu, Liu, Li & Zhang, ICCV 2019) -----------------------------------------

def rbf_correlation(e: torch.Tensor, gamma: float, order: int) -> torch.Tensor:
    """(B, B) Gaussian-RBF correlations exp(-gamma ||f_i - f_j||^2) of the L2-normalized rows,
    by the Taylor expansion sum_{p=0..order} exp(-2 gamma) (2 gamma)^p / p! (f_i'f_j)^p.

    With unit rows ||f_i - f_j||^2 = 2 - 2 f_i'f_j, so the kernel is exp(-2 gamma) exp(2 gamma f_i'f_j).
    """
    e = F.normalize(e, p=2, dim=1)
    similarity = e @ e.t()
    scale = math.exp(-2.0 * gamma)
    return sum(scale * (2.0 * gamma) ** p / math.factorial(p) * similarity.pow(p) for p in range(order + 1))


@TERMS.register("cc", family="relation")
class CCTerm(nn.Module):
    """Correlation congruence: match the batch's kernel correlation matrices of the embeddings.

    Peng et al., "Correlation Congruence for Knowledge Distillation", ICCV 2019 (arXiv:1904.01802), with
    the Gaussian RBF kernel by its P-order Taylor expansion:
        C = [k(F_i, F_j)] in R^{B x B},  k(F_i, F_j) = exp(-gamma ||F_i - F_j||^2)
                                                    ~ sum_{p=0..P} exp(-2 gamma) (2 gamma)^p / p! (F_i'F_j)^p
        L_CC = ||C^T - C^S||_F^2 / B^2
    with the paper's P = 2, gamma = 0.4 on L2-normalized features. This is the paper's kernel
    formulation (as in Knowledge-Distillation-Zoo), NOT RepDistiller's `Correlation` loss, which is a
    different quantity on trainable embeddings of both networks; hence the config's weight 100 (the
    weight Knowledge-Distillation-Zoo uses for this formulation) rather than RepDistiller's 0.02.
    Only the correlation congruence is here; the paper's instance congruence is plain KD (add a kd term).

    `embed`: a learnable linear map of the student embedding to the teacher's width before the
    kernel. None (default): only when the widths differ (the correlations are B x B either way).
    """

    needs_teacher = True
    needs_features = True

    def __init__(self, shapes: FeatureShapes, gamma: float = 0.4, order: int = 2, embed: Optional[bool] = None):
        super().__init__()
        if int(order) < 0 or float(gamma) <= 0:
            raise KdrunError(f"distill.terms.cc: order={order} must be >= 0 and gamma={gamma} > 0, "
                             f"e.g. order=2 gamma=0.4")
        if shapes.student_dim <= 0 or shapes.teacher_dim <= 0:
            raise KdrunError("distill=cc needs the embedding widths (FeatureShapes.student_dim / teacher_dim); "
                             "build the loss through kdrun's runner, which measures them")
        self.gamma, self.order = float(gamma), int(order)
        if embed is None:
            embed = shapes.student_dim != shapes.teacher_dim
        self.embed = nn.Linear(shapes.student_dim, shapes.teacher_dim) if embed else nn.Identity()

    def forward(self, ctx: StepContext) -> torch.Tensor:
        student, teacher = embedding_pair(ctx, "cc")
        with torch.no_grad():
            c_teacher = rbf_correlation(teacher, self.gamma, self.order)
        c_student = rbf_correlation(self.embed(student), self.gamma, self.order)
        return (c_teacher - c_student).pow(2).mean()


# --- SP (Tung & Mori, ICCV 2019) ----------------------------------------------------------------------

def similarity_matrix(features: torch.Tensor) -> torch.Tensor:
    """G~ = row-L2-normalized Q Q' for Q the (B, C*H*W) flattened activation map."""
    flat = features.flatten(1)
    return F.normalize(flat @ flat.t(), p=2, dim=1)


@TERMS.register("sp", family="relation")
class SPTerm(nn.Module):
    """Similarity-preserving KD: similar inputs should give similar activations in both networks.

    Tung & Mori, "Similarity-Preserving Knowledge Distillation", ICCV 2019 (arXiv:1907.09682):
        G = Q Q' (B x B, Q the flattened activation map),  G~[i, :] = G[i, :] / ||G[i, :]||_2
        L_SP = 1/B^2 sum_(l, l') ||G~_T^(l) - G~_S^(l')||_F^2
    The paper (and RepDistiller) use the last stage only (`stages` default [-1]); with several stages
    kdrun *averages* their losses. The config's weight plays the paper's gamma (3000 on CIFAR-10).
    Widths and sizes need not match: only B x B matrices are compared.
    """

    needs_teacher = True
    needs_features = True

    def __init__(self, shapes: FeatureShapes, stages: Sequence[int] = (-1,)):
        super().__init__()
        pairs = check_pairs(shapes, "sp")
        stages = [int(s) for s in stages]
        if not stages or any(not -pairs <= s < pairs for s in stages):
            raise KdrunError(f"distill.terms.sp.stages={stages} must list matched-pair indices within "
                             f"{-pairs}..{pairs - 1} ({pairs} pair(s)), e.g. stages=[-1] for the deepest")
        self.stages = sorted({s % pairs for s in stages})

    def forward(self, ctx: StepContext) -> torch.Tensor:
        pairs = feature_pairs(ctx)
        total = 0.0
        for stage in self.stages:
            student, teacher = pairs[stage]
            with torch.no_grad():
                g_teacher = similarity_matrix(teacher)
            batch = student.shape[0]
            total = total + (g_teacher - similarity_matrix(student)).pow(2).sum() / (batch * batch)
        return total / len(self.stages)


# --- CRD (Tian, Krishnan & Isola, ICLR 2020) ----------------------------------------------------------

def random_unit_rows(rows: int, dim: int) -> torch.Tensor:
    """(rows, dim) rows drawn uniformly on the unit sphere: the memory before any sample was seen."""
    return F.normalize(torch.randn(rows, dim), p=2, dim=1)


@TERMS.register("crd", family="relation")
class CRDTerm(nn.Module):
    """Contrastive representation distillation: the student's embedding of a sample must pick the
    teacher's embedding of the same sample out of nce_k embeddings of other samples, and vice versa.

    Tian, Krishnan & Isola, "Contrastive Representation Distillation", ICLR 2020 (arXiv:1910.10699): with
    g^S, g^T linear maps to `feat_dim` followed by L2 normalization, the critic
    h(t, s) = exp(g^T(t)'g^S(s) / tau) scores the positive pair (same sample) against N negatives
    drawn from a memory bank of embeddings computed in earlier steps.

    Objective (`objective`, default `nce`, the paper's eq. 19 and its code): with M = nce_k negatives,
    P_n = 1 / num_samples and h = exp(z'm / tau) / Z, Z = num_samples * mean(exp(z'm / tau)) estimated on
    the first training batch and then fixed (kept in the checkpoint),
        L = -(1/B) sum_i [ log(h_i+ / (h_i+ + M P_n)) + sum_k log(M P_n / (h_ik + M P_n)) ].
    `objective=infonce`: the softmax form, a (1 + M)-way cross-entropy at temperature tau,
        L = -(1/B) sum_i log [ exp(z_i'm_i / tau) / sum_{c in {i, n_1..n_M}} exp(z_i'm_c / tau) ],
    no Z to estimate. As in the authors' code the loss is symmetric: the student anchor against the
    teacher memory (trains the student and g^S) plus the teacher anchor against the student memory
    (trains g^T; the teacher network itself is frozen).

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
                 momentum: float = 0.5, objective: str = "nce"):
        super().__init__()
        if objective not in ("nce", "infonce"):
            raise KdrunError(f"distill.terms.crd.objective={objective} must be nce (the paper's) or infonce")
        self.objective = objective
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
        # NCE's normalization constants Z, one per anchor side (student, teacher); -1 until estimated.
        self.register_buffer("nce_z", torch.full((2,), -1.0))

    def sample_contrast(self, indices: torch.Tensor) -> torch.Tensor:
        """(B, 1 + nce_k) memory rows: the sample itself first, then nce_k others drawn uniformly."""
        others = torch.randint(0, self.num_samples - 1, (indices.shape[0], self.nce_k), device=indices.device)
        others = others + (others >= indices.unsqueeze(1)).long()   # skip the positive: uniform over the rest
        return torch.cat([indices.unsqueeze(1), others], dim=1)

    def contrast_loss(self, anchor: torch.Tensor, memory: torch.Tensor, contrast: torch.Tensor,
                      side: int) -> torch.Tensor:
        """The objective of each anchor over its (1 + nce_k) memory rows, the positive at column 0."""
        batch, candidates = contrast.shape
        rows = memory.index_select(0, contrast.reshape(-1)).view(batch, candidates, -1).to(anchor.dtype)
        logits = torch.bmm(rows, anchor.unsqueeze(2)).squeeze(2) / self.nce_t
        if self.objective == "infonce":
            return F.cross_entropy(logits, torch.zeros(batch, dtype=torch.long, device=anchor.device))
        scores = torch.exp(logits)
        if self.nce_z[side] < 0:  # the first batch fixes Z, as in the authors' code
            self.nce_z[side] = scores.detach().mean() * self.num_samples
        h = scores / float(self.nce_z[side])  # a number: the buffer is written in place on the first batch
        noise = self.nce_k / self.num_samples  # M * P_n
        eps = 1e-7
        log_positive = torch.log(h[:, 0] / (h[:, 0] + noise + eps))
        log_negative = torch.log(noise / (h[:, 1:] + noise + eps))
        return -(log_positive.sum() + log_negative.sum()) / batch

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
        loss = (self.contrast_loss(z_student, self.memory_teacher, contrast, side=0)
                + self.contrast_loss(z_teacher, self.memory_student, contrast, side=1))
        if self.training:
            self.update_memory(self.memory_student, indices, z_student.detach())
            self.update_memory(self.memory_teacher, indices, z_teacher.detach())
        return loss


# The relation terms as registered (a live view of kdrun.distill.registry.TERMS, not a list to extend).
RELATION_TERMS = TERMS.view(family="relation")

__all__ = ["CCTerm", "CRDTerm", "PKTTerm", "RELATION_TERMS", "RKDTerm", "SPTerm", "cosine_conditional_probabilities",
           "embedding_pair", "normalized_distances", "rbf_correlation", "rkd_parts", "similarity_matrix",
           "triplet_angles"]

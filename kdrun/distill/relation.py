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
from kdrun.distill.relation_common import embedding_pair
from kdrun.distill.relation_crd import CRDTerm
from kdrun.errors import KdrunError


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


class RKDTerm(nn.Module):
    """Relational knowledge distillation: distance- and angle-wise relations of the embeddings.

    Park, Kim, Lu & Cho, "Relational Knowledge Distillation", CVPR 2019, Eqs. (3)-(8):
        psi_D(t_i, t_j) = ||t_i - t_j||_2 / mu,  mu = mean of ||t_i - t_j||_2 over the pairs with i != j
        psi_A(t_i, t_j, t_k) = <e_ij, e_kj>,     e_ij = (t_i - t_j) / ||t_i - t_j||_2
        L = distance_weight * sum_pairs l_delta(psi_D^T, psi_D^S) + angle_weight * sum_triplets l_delta(psi_A^T, psi_A^S)
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


class PKTTerm(nn.Module):
    """Probabilistic knowledge transfer: match the cosine-kernel conditional distributions of the batch.

    Passalis & Tefas, "Learning Deep Representations with Probabilistic Knowledge Transfer", ECCV 2018
    (section 3, with the cosine similarity kernel of section 3.2):
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


class CCTerm(nn.Module):
    """Correlation congruence: match the batch's kernel correlation matrices of the embeddings.

    Peng et al., "Correlation Congruence for Knowledge Distillation", ICCV 2019 (section 3.3, Gaussian
    RBF kernel by its P-order Taylor expansion):
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


class SPTerm(nn.Module):
    """Similarity-preserving KD: similar inputs should give similar activations in both networks.

    Tung & Mori, "Similarity-Preserving Knowledge Distillation", ICCV 2019 (section 3):
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


RELATION_TERMS: dict[str, type[nn.Module]] = {
    "rkd": RKDTerm,
    "pkt": PKTTerm,
    "cc": CCTerm,
    "sp": SPTerm,
    "crd": CRDTerm,
}

__all__ = ["CCTerm", "CRDTerm", "PKTTerm", "RELATION_TERMS", "RKDTerm", "SPTerm", "cosine_conditional_probabilities",
           "normalized_distances", "rbf_correlation", "rkd_parts", "similarity_matrix", "triplet_angles"]

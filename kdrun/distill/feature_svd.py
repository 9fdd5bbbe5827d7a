"""KDSVD (Lee, Kim & Song, ECCV 2018): singular vectors of consecutive feature maps, related by an RBF."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kdrun.distill.context import FeatureShapes, StepContext
from kdrun.distill.feature_common import channel_adapters, check_pairs, feature_pairs
from kdrun.distill.registry import TERMS
from kdrun.errors import KdrunError


def _finite(x: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isfinite(x), x, torch.zeros_like(x))


class _TopRightSingular(torch.autograd.Function):
    """Singular values and the first n right singular vectors of a batch of matrices (B, m, c).

    The gradient reaches the matrix through the n kept vectors only, from the eigenvectors of A^T A
    (lambda = s^2): dv_i = sum_{j != i} v_j v_j^T dG v_i / (lambda_i - lambda_j) + P dG v_i / lambda_i, P the
    projector off the row space. torch's SVD gradient also uses the pairs of discarded vectors, 0 * inf = nan
    as soon as two of those singular values coincide (a rank-deficient map, e.g. a 1x1 conv widening a thin
    student's map); here such pairs never enter, and a coefficient that is still not finite (two kept
    values equal) is dropped, as the authors' custom SVD gradient drops it. Equal to torch's otherwise.
    The singular values carry no gradient: the student's are unused, the teacher's are constants.
    """

    @staticmethod
    def forward(ctx, matrix: torch.Tensor, n: int):
        _, s, vh = torch.linalg.svd(matrix, full_matrices=False)
        v = vh.transpose(-2, -1)
        ctx.save_for_backward(matrix, s, v)
        ctx.mark_non_differentiable(s)
        return s, v[..., :n]

    @staticmethod
    def backward(ctx, grad_s, grad_v):
        matrix, s, v = ctx.saved_tensors
        n = grad_v.shape[-1]
        lam = s * s
        kept = lam[..., :n].unsqueeze(-2)                                # (B, 1, n): lambda_i
        coef = _finite(1 / (kept - lam.unsqueeze(-1)))                    # (B, k, n): 1 / (lambda_i - lambda_j)
        coef[..., torch.arange(n), torch.arange(n)] = 0                   # j == i
        proj = v.transpose(-2, -1) @ grad_v                              # (B, k, n): v_j' g_i
        dv = v @ (coef * proj) + _finite((grad_v - v @ proj) / kept)      # (B, c, n)
        m = dv @ v[..., :n].transpose(-2, -1)                            # dL/dG (B, c, c)
        return matrix @ (m + m.transpose(-2, -1)), None


def top_singular(features: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, V) of the map seen as an (H*W) x C matrix per sample: the first n singular values, L2-normalized
    over those n, and the first n right singular vectors (B, C, n), each of unit length."""
    matrix = features.flatten(2).transpose(1, 2)                          # (B, HW, C)
    if matrix.dtype in (torch.float16, torch.bfloat16):  # no half-precision SVD: decompose in float32
        matrix = matrix.float()
    with torch.autocast(matrix.device.type, enabled=False):
        s, v = _TopRightSingular.apply(matrix, n)
    return F.normalize(_finite(s)[:, :n], dim=1), F.normalize(_finite(v), dim=1)


def align_to(student_v: torch.Tensor, teacher_v: torch.Tensor) -> torch.Tensor:
    """For each teacher vector, the student vector of largest |cosine| with it, signed to agree: (B, C, k)."""
    cosine = student_v.transpose(-2, -1) @ teacher_v                       # (B, k + 3, k)
    best = cosine.abs().amax(dim=1, keepdim=True)
    pick = torch.where(cosine.abs() == best, torch.sign(cosine), torch.zeros_like(cosine))
    return student_v @ pick


def rbf(v: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
    """exp(-(v_i - v'_j)^2 / 8) for every channel i of this map and j of the previous one: (B, C, C', k)."""
    return torch.exp(-(v.unsqueeze(2) - previous.unsqueeze(1)).pow(2) / 8)


@TERMS.register("kdsvd", family="feature")
class KDSVDTerm(nn.Module):
    """The student's RBF correlations between the singular vectors of consecutive maps match the teacher's.

    Lee, Kim & Song, "Self-supervised Knowledge Distillation Using Singular Value Decomposition", ECCV 2018:
    each map (H*W x C per sample) is compressed by truncated SVD to its first k right singular vectors,
    scaled by the teacher's normalized singular values; the student keeps k + 3 and each teacher vector takes
    the student vector of largest |cosine| (sign-aligned); the knowledge is the RBF
    G = exp(-(v_i - v'_j)^2 / 8) between the vectors of consecutive maps, and
        L = 1/B * sum_stages sum (G_S - G_T)^2   (non-finite entries dropped, as the authors' code).
    kdrun follows RepDistiller's port (Tian et al., ICLR 2020) of the authors' TensorFlow code, k = 1, on the
    matched maps. The RBF compares channels, so student and teacher widths must agree: the reference code
    refuses other pairs; kdrun puts a 1x1 conv + BN on the student's maps where the widths differ. The SVD's
    gradient flows through the kept vectors only (:class:`_TopRightSingular`): a widened student map is
    rank-deficient, where torch's full SVD gradient is nan (the authors' TensorFlow code has a custom one too).
    """

    needs_teacher = True
    needs_features = True

    def __init__(self, shapes: FeatureShapes, k: int = 1):
        super().__init__()
        pairs = check_pairs(shapes, "kdsvd")
        if pairs < 2:
            raise KdrunError(f"distill=kdsvd relates consecutive feature maps but got {pairs} matched pair: name at "
                             f"least two layers on both sides with distill.student_layers / distill.teacher_layers")
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise KdrunError(f"distill.terms.kdsvd.k={k!r} must be a whole number >= 1, e.g. distill.terms.kdsvd.k=1")
        self.k = k
        self.adapters = channel_adapters(shapes)

    def forward(self, ctx: StepContext) -> torch.Tensor:
        pairs = feature_pairs(ctx)
        total, previous = 0.0, None
        for adapter, (student, teacher) in zip(self.adapters, pairs):
            s_t, v_t = top_singular(teacher, self.k)
            _, v_s = top_singular(adapter(student), self.k + 3)
            v_s = align_to(v_s, v_t)
            scale = s_t.unsqueeze(1)
            v_t, v_s = v_t * scale, v_s * scale
            if previous is not None:
                diff = (rbf(v_s, previous[0]) - rbf(v_t, previous[1]).detach()).pow(2)
                total = total + _finite(diff).sum()
            previous = (v_s, v_t)
        return total / pairs[0][0].shape[0]

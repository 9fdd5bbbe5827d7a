"""Feature-based terms: the student matches the teacher's intermediate feature maps.

Every term reads ``ctx.student_features`` / ``ctx.teacher_features`` (matched pairs of (B, C, H, W)
maps, shallow to deep) and is built for the measured :class:`FeatureShapes`, so its learnable parts
(regressors, variances, fusion modules) exist before the optimizer: they are submodules of the term,
trained with the student and saved in its checkpoint. Teacher maps are detached in every term.
Where sizes differ, AT, NST and VID pool the larger map down to the smaller (``pool_to_common_size``), as the
authors' codes do; FitNets' regressor maps the student's size to the teacher's.

Per-stage losses are *summed* over the matched stages, as in the authors' code and RepDistiller
(Tian et al., ICLR 2020), whose loss weights the configs use.
"""
from __future__ import annotations

import math

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from kdrun.distill.context import FeatureShapes, StepContext
from kdrun.distill.feature_common import check_pairs, conv_bn, feature_pairs, pool_to_common_size, resize_to
from kdrun.distill.feature_review import ReviewKDTerm
from kdrun.distill.registry import TERMS
from kdrun.errors import KdrunError


# --- FitNets (Romero, Ballas, Kahou, Chassang, Gatta & Bengio, ICLR 2015) ------------------------------

REGRESSORS = ("conv_bn_relu", "conv_bn")


def hint_regressor(kind: str, student_channels: int, teacher_channels: int, student_size: tuple[int, int],
                   teacher_size: tuple[int, int], relu: bool = True) -> nn.Module:
    """The learnable map r from the student's hint map to the teacher's guided map (channels and size).

    `conv_bn_relu` (default) is the regressor of the FitNets reference codes (RepDistiller's and
    mdistiller's ``ConvReg``): a convolution chosen by the sizes, then BatchNorm and ReLU:
      - student map twice the teacher's: 3x3 convolution, stride 2, padding 1;
      - student map half the teacher's: 4x4 transposed convolution, stride 2, padding 1;
      - student map at least the teacher's: a (1 + Hs - Ht) x (1 + Ws - Wt) convolution (1x1 when equal);
      - otherwise (the reference codes refuse it): the student map is resized to the teacher's, then 1x1.
    `conv_bn` is kdrun's earlier regressor: resize to the teacher's size, 1x1 convolution + BatchNorm.
    `relu=False` drops the final ReLU (the reference codes' ``ConvReg(use_relu=False)``, AB's connector).
    """
    if kind == "conv_bn":
        return ResizeThen(conv_bn(student_channels, teacher_channels), teacher_size)
    (sh, sw), (th, tw) = student_size, teacher_size
    resize = None
    if (sh, sw) == (2 * th, 2 * tw):
        conv = nn.Conv2d(student_channels, teacher_channels, kernel_size=3, stride=2, padding=1)
    elif (2 * sh, 2 * sw) == (th, tw):
        conv = nn.ConvTranspose2d(student_channels, teacher_channels, kernel_size=4, stride=2, padding=1)
    elif sh >= th and sw >= tw:
        conv = nn.Conv2d(student_channels, teacher_channels, kernel_size=(1 + sh - th, 1 + sw - tw))
    else:
        conv, resize = nn.Conv2d(student_channels, teacher_channels, kernel_size=1), teacher_size
    layers = nn.Sequential(conv, nn.BatchNorm2d(teacher_channels), *([nn.ReLU()] if relu else []))
    return ResizeThen(layers, resize) if resize is not None else layers


class ResizeThen(nn.Module):
    """Resize the input map to `size` (pool down, bilinear up), then apply `layers`."""

    def __init__(self, layers: nn.Module, size: tuple[int, int]):
        super().__init__()
        self.layers, self.size = layers, tuple(size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(resize_to(x, self.size))


@TERMS.register("fitnets", family="feature")
class FitNetsTerm(nn.Module):
    """Hint loss of FitNets: the student's hint layer, through a regressor, predicts the teacher's
    guided layer.

    Romero et al., "FitNets: Hints for Thin Deep Nets", ICLR 2015, Eq. (3):
        L_HT = 1/2 * || u_h(x) - r(v_g(x); W_r) ||^2
    with u_h the teacher's hint layer, v_g the student's guided layer and r a convolutional regressor
    (:func:`hint_regressor`: by default the reference codes' convolution + BatchNorm + ReLU, always
    present, as in the paper, even when the widths agree). The squared error is averaged over elements
    (RepDistiller's ``HintLoss``) rather than halved and summed. The paper trains in two stages (hints
    first, then KD); kdrun trains CE + hint jointly, as RepDistiller does.

    `layer` indexes the matched pairs (-1 is the deepest). The default, None, takes the second-deepest
    (a middle stage as in the paper), or the only pair when stages match once (a ViT against a CNN).
    """

    needs_teacher = True
    needs_features = True

    def __init__(self, shapes: FeatureShapes, layer: Optional[int] = None, regressor: str = "conv_bn_relu"):
        super().__init__()
        pairs = check_pairs(shapes, "fitnets")
        if layer is None:
            layer = -2 if pairs > 1 else -1
        if not -pairs <= int(layer) < pairs:
            raise KdrunError(f"distill.terms.fitnets.layer={layer} is out of range for {pairs} matched feature "
                             f"pair(s): choose within {-pairs}..{pairs - 1}, e.g. layer=-1 for the deepest")
        if regressor not in REGRESSORS:
            raise KdrunError(f"distill.terms.fitnets.regressor={regressor!r} is not one of {', '.join(REGRESSORS)}: "
                             f"pass e.g. distill.terms.fitnets.regressor=conv_bn_relu")
        self.layer = int(layer) % pairs
        i = self.layer
        self.regressor = hint_regressor(regressor, shapes.student_channels[i], shapes.teacher_channels[i],
                                        tuple(shapes.student_sizes[i]), tuple(shapes.teacher_sizes[i]))

    def forward(self, ctx: StepContext) -> torch.Tensor:
        student, teacher = feature_pairs(ctx)[self.layer]
        return F.mse_loss(self.regressor(student), teacher)


# --- Attention transfer (Zagoruyko & Komodakis, ICLR 2017) --------------------------------------------

def attention_map(features: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """Q = vec(mean_c |F_c|^p) / ||vec(mean_c |F_c|^p)||_2: (B, C, H, W) -> (B, H*W)."""
    return F.normalize(features.abs().pow(p).mean(dim=1).flatten(1), dim=1)


@TERMS.register("at", family="feature")
class ATTerm(nn.Module):
    """Activation-based attention transfer.

    Zagoruyko & Komodakis, "Paying More Attention to Attention: Improving the Performance of
    Convolutional Neural Networks via Attention Transfer", ICLR 2017, Eq. (2):
        L = CE + beta/2 * sum_j || Q_S^j / ||Q_S^j||_2 - Q_T^j / ||Q_T^j||_2 ||_p
    with Q = vec(F^p_mean(A)) the spatial attention map of stage j. As in the authors' code and
    RepDistiller, each stage contributes the mean squared difference of the normalized maps,
    (at(s) - at(t)).pow(2).mean(), and stages are summed (the config's weight plays beta).
    Channel counts need not match; where sizes differ the larger map is average-pooled to the smaller
    one's size (the teacher's pooled down when the student's is smaller), as in the authors' code.
    """

    needs_teacher = True
    needs_features = True

    def __init__(self, shapes: FeatureShapes, p: float = 2.0):
        super().__init__()
        check_pairs(shapes, "at")
        self.p = float(p)

    def forward(self, ctx: StepContext) -> torch.Tensor:
        total = 0.0
        for student, teacher in feature_pairs(ctx):
            student, teacher = pool_to_common_size(student, teacher)
            total = total + (attention_map(student, self.p) - attention_map(teacher, self.p)).pow(2).mean()
        return total


# --- NST (Huang & Wang, 2017) --------------------------------------------------------------------------

def polynomial_mmd2(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Squared MMD with k(x, y) = (x'y)^2 between the channels of two maps of equal H, W, batch-averaged.

    Each channel's map, flattened and L2-normalized, is one sample of the layer's distribution.
    The teacher-teacher term does not depend on the student: it is computed without gradients and
    kept so that the value is the true MMD^2 (0 when the distributions agree).
    """
    f_s = F.normalize(student.flatten(2), dim=2)                  # (B, C_S, HW)
    f_t = F.normalize(teacher.flatten(2), dim=2)                  # (B, C_T, HW)
    k_ss = torch.bmm(f_s, f_s.transpose(1, 2)).pow(2).mean()
    k_st = torch.bmm(f_s, f_t.transpose(1, 2)).pow(2).mean()
    with torch.no_grad():
        k_tt = torch.bmm(f_t, f_t.transpose(1, 2)).pow(2).mean()
    return k_tt + k_ss - 2 * k_st


@TERMS.register("nst", family="feature")
class NSTTerm(nn.Module):
    """Neuron selectivity transfer: match the distributions of the channels' activation maps.

    Huang & Wang, "Like What You Like: Knowledge Distill via Neuron Selectivity Transfer",
    arXiv:1707.01219, 2017 (section 3), with the polynomial kernel k(x, y) = (x'y + c)^d, d = 2, c = 0:
        MMD^2 = 1/C_T^2 sum_{i,i'} k(f_T^i, f_T^i') + 1/C_S^2 sum_{j,j'} k(f_S^j, f_S^j')
                - 2/(C_S C_T) sum_{i,j} k(f_S^j, f_T^i)
    over the L2-normalized flattened channel maps f^i, averaged over the batch and summed over stages
    (RepDistiller; the paper writes lambda/2 * MMD^2, which the config's weight absorbs). Maps of
    different sizes are both brought to the smaller size by average pooling, as in the authors' code.
    """

    needs_teacher = True
    needs_features = True

    def __init__(self, shapes: FeatureShapes):
        super().__init__()
        check_pairs(shapes, "nst")

    def forward(self, ctx: StepContext) -> torch.Tensor:
        total = 0.0
        for student, teacher in feature_pairs(ctx):
            total = total + polynomial_mmd2(*pool_to_common_size(student, teacher))
        return total


# --- VID (Ahn, Hu, Damianou, Lawrence & Dai, CVPR 2019) -----------------------------------------------

def _conv1x1(in_channels: int, out_channels: int) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False)


class VIDStage(nn.Module):
    """One stage of VID: a Gaussian q(t | s) with a learned mean mu(s) and per-channel variance."""

    def __init__(self, student_channels: int, teacher_channels: int, init_pred_var: float, eps: float):
        super().__init__()
        mid = teacher_channels
        self.mean = nn.Sequential(_conv1x1(student_channels, mid), nn.ReLU(),
                                  _conv1x1(mid, mid), nn.ReLU(),
                                  _conv1x1(mid, teacher_channels))
        # softplus(alpha) + eps == init_pred_var at the start
        alpha = math.log(math.expm1(init_pred_var - eps))
        self.alpha = nn.Parameter(torch.full((teacher_channels,), alpha))
        self.eps = eps

    def variance(self) -> torch.Tensor:
        return F.softplus(self.alpha) + self.eps

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        student, teacher = pool_to_common_size(student, teacher)
        mu = self.mean(student)
        var = self.variance().view(1, -1, 1, 1)
        return (0.5 * ((teacher - mu).pow(2) / var + var.log())).mean()


@TERMS.register("vid", family="feature")
class VIDTerm(nn.Module):
    """Variational information distillation: maximize a variational lower bound on I(t; s).

    Ahn et al., "Variational Information Distillation for Knowledge Transfer", CVPR 2019 (section 3):
    with a Gaussian q(t | s) of mean mu(s) and per-channel variance sigma_c^2,
        -log q(t | s) = sum_{c,h,w} [ log sigma_c + (t_{c,h,w} - mu_{c,h,w}(s))^2 / (2 sigma_c^2) ] + const
    mu is three 1x1 convolutions with ReLUs (hidden width = the teacher's channels) and
    sigma_c^2 = softplus(alpha_c) + eps, initialized to `init_pred_var`. As in the authors'
    implementation in RepDistiller, the NLL is averaged over elements and summed over stages; maps of
    different sizes are both average-pooled to the smaller size first, as there.
    """

    needs_teacher = True
    needs_features = True

    def __init__(self, shapes: FeatureShapes, init_pred_var: float = 5.0, eps: float = 1e-5):
        super().__init__()
        check_pairs(shapes, "vid")
        if init_pred_var <= eps:
            raise KdrunError(f"distill.terms.vid.init_pred_var={init_pred_var} must be > eps={eps}, e.g. 5.0")
        self.stages = nn.ModuleList(VIDStage(s, t, float(init_pred_var), float(eps))
                                    for s, t in zip(shapes.student_channels, shapes.teacher_channels))

    def forward(self, ctx: StepContext) -> torch.Tensor:
        return sum(stage(student, teacher) for stage, (student, teacher) in zip(self.stages, feature_pairs(ctx)))


# The feature terms as registered (a live view of kdrun.distill.registry.TERMS, not a list to extend).
FEATURE_TERMS = TERMS.view(family="feature")

__all__ = ["ATTerm", "FEATURE_TERMS", "FitNetsTerm", "NSTTerm", "ReviewKDTerm", "VIDTerm", "attention_map",
           "polynomial_mmd2"]

"""Factor transfer (Kim, Park & Kwak, NeurIPS 2018): a paraphraser's factors of the teacher, a translator's of the student."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from kdrun.distill.context import FeatureShapes, StepContext
from kdrun.distill.feature_common import check_init_phase, check_pairs, feature_pairs, pool_to_common_size
from kdrun.distill.registry import TERMS
from kdrun.errors import KdrunError


def _conv_stack(channels: list[int], transposed: bool, batchnorm: bool) -> nn.Sequential:
    """3x3 (transposed) convolutions, stride 1, padding 1, each followed by [BatchNorm and] LeakyReLU(0.1)."""
    conv = nn.ConvTranspose2d if transposed else nn.Conv2d
    layers: list[nn.Module] = []
    for c_in, c_out in zip(channels[:-1], channels[1:]):
        layers += [conv(c_in, c_out, 3, 1, 1), *([nn.BatchNorm2d(c_out)] if batchnorm else []), nn.LeakyReLU(0.1)]
    return nn.Sequential(*layers)


class Paraphraser(nn.Module):
    """Teacher side: an encoder C -> C -> kC -> kC to the factor and a decoder back, trained to reconstruct."""

    def __init__(self, channels: int, factor_channels: int):
        super().__init__()
        self.encoder = _conv_stack([channels, channels, factor_channels, factor_channels], False, False)
        self.decoder = _conv_stack([factor_channels, factor_channels, channels, channels], True, False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))


FORMS = ("repdistiller", "authors")


def factor_map(factor: torch.Tensor, p: float) -> torch.Tensor:
    """normalize(vec(mean_c F_c^p)): RepDistiller's reading of the paper's normalized factor, (B, C, H, W) -> (B, H*W)."""
    return F.normalize(factor.pow(p).mean(1).flatten(1))


def flat_factor(factor: torch.Tensor) -> torch.Tensor:
    """normalize(vec(F)): the paper's and its authors' normalized factor, (B, C, H, W) -> (B, C*H*W)."""
    return F.normalize(factor.flatten(1))


@TERMS.register("ft", family="feature")
class FTTerm(nn.Module):
    """The student's translated factor matches the teacher's paraphrased factor.

    Kim, Park & Kwak, "Paraphrasing Complex Network: Network Compression via Factor Transfer", NeurIPS 2018,
    Eq. (1)-(3): the paraphraser is trained first as an autoencoder of the teacher's last map,
        L_rec = || x - P(x) ||^2,
    then frozen; the student's translator is trained with L = CE + beta * || F_T/||F_T||_2 - F_S/||F_S||_2 ||_p
    (p = 1). kdrun follows RepDistiller (Tian et al., ICLR 2020), whose defaults it keeps: the paraphraser
    (three 3x3 convs with LeakyReLU(0.1), no BatchNorm, factor width int(k * teacher channels), k = 0.5, and
    three transposed ones back) is trained for `init_epochs` (30) epochs on the element-mean squared
    reconstruction error at a constant `init_lr` (0.01; null: the run's lr) by kdrun.engine.init_phase; the
    translator (the same three convs with BatchNorm, from the student's channels) is trained with the student.
    Both factors are compared as normalize(vec(mean_c F_c^p1)) with p1 = 2 (RepDistiller's `factor`), by the
    element mean of |difference|^p (p = 1); where sizes differ the larger is pooled to the smaller.
    `layer` indexes the matched pairs; -1 (default) is the deepest, the map before pooling as in RepDistiller.
    `form: authors` is the FT authors' code (Jangho-Kim/Factor-Transfer-pytorch) instead: factor width
    round(k * C), no BatchNorm in the translator, reconstruction by the element-mean absolute error, and the
    paper's factor normalize(vec(F)) compared by the element mean of |difference| (their beta: 500).
    """

    needs_teacher = True
    needs_features = True
    init_trains_student = False

    def __init__(self, shapes: FeatureShapes, layer: int = -1, k: float = 0.5, p1: float = 2.0, p: float = 1.0,
                 init_epochs: int = 30, init_lr: Optional[float] = 0.01, form: str = "repdistiller"):
        super().__init__()
        pairs = check_pairs(shapes, "ft")
        if form not in FORMS:
            raise KdrunError(f"distill.terms.ft.form={form!r} is not one of {', '.join(FORMS)}: pass e.g. "
                             f"distill.terms.ft.form=repdistiller")
        self.form = form
        if not -pairs <= int(layer) < pairs:
            raise KdrunError(f"distill.terms.ft.layer={layer} is out of range for {pairs} matched feature "
                             f"pair(s): choose within {-pairs}..{pairs - 1}, e.g. layer=-1 for the deepest")
        self.layer = int(layer) % pairs
        student_channels, teacher_channels = shapes.student_channels[self.layer], shapes.teacher_channels[self.layer]
        factor_channels = int(teacher_channels * k) if form == "repdistiller" else int(round(teacher_channels * k))
        if factor_channels < 1:
            raise KdrunError(f"distill.terms.ft.k={k} leaves int(k * {teacher_channels}) = {factor_channels} factor "
                             f"channels: pick k in (0, 1], e.g. distill.terms.ft.k=0.5")
        if init_lr is not None and init_lr <= 0:
            raise KdrunError(f"distill.terms.ft.init_lr={init_lr} must be > 0 (or null for the run's lr)")
        self.init_epochs = check_init_phase("ft", init_epochs, joint=True)  # 0: an untrained paraphraser
        self.init_lr = None if init_lr is None else float(init_lr)
        self.p1, self.p = float(p1), float(p)
        self.paraphraser = Paraphraser(teacher_channels, factor_channels)
        self.translator = _conv_stack([student_channels, student_channels, factor_channels, factor_channels],
                                      False, form == "repdistiller")

    def init_loss(self, ctx: StepContext) -> torch.Tensor:
        teacher = feature_pairs(ctx)[self.layer][1]
        rebuilt = self.paraphraser(teacher)
        return F.mse_loss(rebuilt, teacher) if self.form == "repdistiller" else F.l1_loss(rebuilt, teacher)

    def forward(self, ctx: StepContext) -> torch.Tensor:
        student, teacher = feature_pairs(ctx)[self.layer]
        with torch.no_grad():  # the paraphraser is frozen after its initialization
            factor_t = self.paraphraser.encoder(teacher)
        factor_s, factor_t = pool_to_common_size(self.translator(student), factor_t)
        if self.form == "authors":
            return (flat_factor(factor_s) - flat_factor(factor_t)).abs().mean()
        diff = factor_map(factor_s, self.p1) - factor_map(factor_t, self.p1)
        return diff.abs().mean() if self.p == 1 else diff.pow(self.p).mean()

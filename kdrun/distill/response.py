"""Response-based terms: they compare the student's logits with labels or with the teacher's logits."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from kdrun.distill.context import StepContext
from kdrun.distill.registry import TERMS
from kdrun.errors import KdrunError


def kd_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, T: float) -> torch.Tensor:
    """T^2 * KL(softmax(t/T) || softmax(s/T)), averaged over the batch.

    The T^2 factor keeps the soft-target gradients on the same scale as the hard-label ones when T
    changes (Hinton et al. 2015, section 2).
    """
    log_p_student = F.log_softmax(student_logits / T, dim=1)
    log_p_teacher = F.log_softmax(teacher_logits / T, dim=1)
    return F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True) * (T * T)


@TERMS.register("ce", family="response")
class CrossEntropyTerm(nn.Module):
    """Hard-label cross-entropy of the student."""

    needs_teacher = False

    def __init__(self, label_smoothing: float = 0.0):
        super().__init__()
        self.label_smoothing = label_smoothing

    def forward(self, ctx: StepContext) -> torch.Tensor:
        loss = F.cross_entropy(ctx.student_logits, ctx.targets, label_smoothing=self.label_smoothing)
        if ctx.student_logits_strong is not None:  # MLKD's strong view is trained on the labels too
            loss = loss + F.cross_entropy(ctx.student_logits_strong, ctx.targets, label_smoothing=self.label_smoothing)
        return loss


@TERMS.register("kd", family="response")
class KDTerm(nn.Module):
    """Hinton's soft-target term at temperature T.

    With `logit_standardize`, both logits are z-scored per sample first (see `standardize_logits`).
    `warmup_epochs` > 0 ramps the term up as `warmup_factor` says (KD++ warms its KD term up; plain KD does not).
    """

    needs_teacher = True

    def __init__(self, T: float = 4.0, logit_standardize: bool = False, warmup_epochs: int = 0,
                 warmup_offset: int = 1):
        super().__init__()
        self.T = float(T)
        self.logit_standardize = bool(logit_standardize)
        self.warmup_epochs, self.warmup_offset = int(warmup_epochs), int(warmup_offset)

    def forward(self, ctx: StepContext) -> torch.Tensor:
        student, teacher = logit_pair(ctx, self.logit_standardize)
        loss = kd_divergence(student, teacher, self.T)
        if self.warmup_epochs > 0:
            loss = warmup_factor(ctx.epoch, self.warmup_epochs, self.warmup_offset) * loss
        return loss


# --- Logit standardization (Sun, Ren, Li, Wang & Cao, CVPR 2024) -------------------------------------

def standardize_logits(logits: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Z-score each sample's logits over the classes: (z - mean(z)) / (std(z) + eps).

    Sun et al., "Logit Standardization in Knowledge Distillation", CVPR 2024 (Algorithm 1): the
    student then only has to match the teacher's logit *relations*, not their range, and T acts as
    a base temperature (the paper suggests about 2). std is Bessel-corrected (divides by K - 1),
    as in the authors' code (torch's default `std`).
    """
    mean = logits.mean(dim=1, keepdim=True)
    std = logits.std(dim=1, keepdim=True)
    return (logits - mean) / (std + eps)


def logit_pair(ctx: StepContext, standardize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(student, teacher) logits of the step, both z-scored per sample when `standardize` is on."""
    if not standardize:
        return ctx.student_logits, ctx.teacher_logits
    return standardize_logits(ctx.student_logits), standardize_logits(ctx.teacher_logits)


def _kl(log_p_student: torch.Tensor, log_p_teacher: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) from log-probabilities, averaged over the batch."""
    return F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)


# --- DKD (Zhao, Cui, Song, Qiu & Liang, CVPR 2022) ----------------------------------------------------

def split_target(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Split (B, K) logits into the target column (B, 1) and the K - 1 non-target ones (B, K - 1)."""
    is_target = F.one_hot(targets, logits.shape[1]).bool()
    # Boolean indexing keeps row-major order and every row has exactly one target.
    return logits[is_target].view(-1, 1), logits[~is_target].view(logits.shape[0], -1)


def binary_log_probs(target: torch.Tensor, others: torch.Tensor) -> torch.Tensor:
    """log [p_t, 1 - p_t] as a 2-way log-softmax over (z_t, logsumexp(z_others)): no log(0) ever."""
    return F.log_softmax(torch.cat([target, others.logsumexp(dim=1, keepdim=True)], dim=1), dim=1)


def dkd_parts(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor,
              T: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(TCKD, NCKD) of Decoupled Knowledge Distillation, each a batch-mean KL times T^2.

    Zhao et al., CVPR 2022 ("reformulating KD"): with b = [p_t, 1 - p_t] the binary target / non-target
    probabilities and p^ the softmax over the non-target classes alone, per sample
        KD = KL(b^T || b^S) + (1 - p_t^T) * KL(p^^T || p^^S) = TCKD + (1 - p_t^T) * NCKD.
    p^ is a softmax over the K - 1 non-target logits (the target column removed rather than
    masked with a large negative number): with K = 2 it has one class, so NCKD is exactly 0.
    """
    s_target, s_others = split_target(student_logits / T, targets)
    t_target, t_others = split_target(teacher_logits / T, targets)
    tckd = _kl(binary_log_probs(s_target, s_others), binary_log_probs(t_target, t_others))
    nckd = _kl(F.log_softmax(s_others, dim=1), F.log_softmax(t_others, dim=1))
    return tckd * (T * T), nckd * (T * T)


def warmup_factor(epoch: int, warmup_epochs: int, offset: int = 1) -> float:
    """min((epoch + offset) / warmup_epochs, 1) for a 0-based epoch.

    The DKD code (mdistiller) counts epochs from 1 and uses min(epoch / warmup, 1); offset 1 (default)
    keeps that schedule: 1/warmup in the first epoch, full weight from epoch `warmup_epochs` on.
    Offset 0 is a code that counts epochs from 0 (ReviewKD's): weight 0 in the first epoch.
    """
    if warmup_epochs <= 0:
        return 1.0
    return min((epoch + offset) / warmup_epochs, 1.0)


@TERMS.register("dkd", family="response")
class DKDTerm(nn.Module):
    """Decoupled KD: warmup * (alpha * TCKD + beta * NCKD) (Zhao et al., CVPR 2022).

    alpha and beta are DKD's own weights, unrelated to kdrun's top-level alpha.
    """

    needs_teacher = True

    def __init__(self, alpha: float = 1.0, beta: float = 8.0, T: float = 4.0, warmup_epochs: int = 20,
                 logit_standardize: bool = False, warmup_offset: int = 1):
        super().__init__()
        self.alpha, self.beta, self.T = float(alpha), float(beta), float(T)
        self.warmup_epochs, self.warmup_offset = int(warmup_epochs), int(warmup_offset)
        self.logit_standardize = bool(logit_standardize)

    def forward(self, ctx: StepContext) -> torch.Tensor:
        student, teacher = logit_pair(ctx, self.logit_standardize)
        tckd, nckd = dkd_parts(student, teacher, ctx.targets, self.T)
        factor = warmup_factor(ctx.epoch, self.warmup_epochs, self.warmup_offset)
        return factor * (self.alpha * tckd + self.beta * nckd)


# --- DIST (Huang, You, Wang, Qian & Xu, NeurIPS 2022) -------------------------------------------------

def pearson_rows(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Pearson correlation between matching rows of a and b (one value per row)."""
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    return (a * b).sum(dim=1) / (a.norm(dim=1) * b.norm(dim=1) + eps)


def dist_parts(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
               T: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(inter-class, intra-class) relation losses of DIST, each times T^2 as in the authors' code.

    Huang et al., "Knowledge Distillation from A Stronger Teacher", NeurIPS 2022, with
    Y = softmax(logits / T) of shape (B, K):
        inter = 1 - mean_i pearson(Y^S[i, :], Y^T[i, :])   (each sample's class ranking)
        intra = 1 - mean_j pearson(Y^S[:, j], Y^T[:, j])   (each class's ranking over the batch)
    A batch of one sample has constant columns: intra is then T^2 with no gradient.
    """
    y_s = F.softmax(student_logits / T, dim=1)
    y_t = F.softmax(teacher_logits / T, dim=1)
    inter = 1 - pearson_rows(y_s, y_t).mean()
    intra = 1 - pearson_rows(y_s.t(), y_t.t()).mean()
    return inter * (T * T), intra * (T * T)


@TERMS.register("dist", family="response")
class DISTTerm(nn.Module):
    """DIST: beta * inter-class + gamma * intra-class relation loss (Huang et al., NeurIPS 2022)."""

    needs_teacher = True

    def __init__(self, beta: float = 1.0, gamma: float = 1.0, T: float = 1.0):
        super().__init__()
        self.beta, self.gamma, self.T = float(beta), float(gamma), float(T)

    def forward(self, ctx: StepContext) -> torch.Tensor:
        inter, intra = dist_parts(ctx.student_logits, ctx.teacher_logits, self.T)
        return self.beta * inter + self.gamma * intra


# --- MLKD (Jin, Wang & Lin, CVPR 2023) -----------------------------------------------------------------

def mlkd_levels(student_logits: torch.Tensor, teacher_logits: torch.Tensor, T: float,
                sample_mask: Optional[torch.Tensor] = None,
                class_mask: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(instance, batch, class) alignment losses of Multi-Level Logit Distillation at one temperature.

    Jin et al., "Multi-Level Logit Distillation", CVPR 2023, with P = softmax(logits / T), (B, K):
        instance = T^2 * batch-mean KL(P^T[i] || P^S[i])
        batch    = ||P^T P^T' - P^S P^S'||_F^2 / B    (B x B sample-similarity Gram matrices)
        class    = ||P^T' P^T - P^S' P^S||_F^2 / K    (K x K class-correlation matrices)
    The two matrix terms carry no T^2 factor, as in the authors' code. `sample_mask` (B,) keeps the
    samples (instance terms, rows of the batch matrix) and `class_mask` (K,) the classes (rows of the
    class matrix) that count; the sums are still divided by B and K.
    """
    p_s = F.softmax(student_logits / T, dim=1)
    p_t = F.softmax(teacher_logits / T, dim=1)
    batch_size, num_classes = p_s.shape
    kl = (p_t * (F.log_softmax(teacher_logits / T, dim=1) - F.log_softmax(student_logits / T, dim=1))).sum(1)
    batch_rows = (p_t @ p_t.t() - p_s @ p_s.t()).pow(2).sum(1)
    class_rows = (p_t.t() @ p_t - p_s.t() @ p_s).pow(2).sum(1)
    if sample_mask is not None:
        kl, batch_rows = kl * sample_mask, batch_rows * sample_mask
    if class_mask is not None:
        class_rows = class_rows * class_mask
    return T * T * kl.sum() / batch_size, batch_rows.sum() / batch_size, class_rows.sum() / num_classes


def confidence_masks(teacher_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """MLKD's masks from the teacher's weak-view prediction P = softmax(z) (T = 1), as in the authors' code:
    samples whose top probability, and classes whose summed probability over the batch, is at most
    the batch median (linear-interpolated, as numpy's percentile 50)."""
    probabilities = F.softmax(teacher_logits.detach().float(), dim=1)
    confidence = probabilities.max(dim=1).values
    class_confidence = probabilities.sum(dim=0)
    return ((confidence <= torch.quantile(confidence, 0.5)).to(teacher_logits.dtype),
            (class_confidence <= torch.quantile(class_confidence, 0.5)).to(teacher_logits.dtype))


MLKD_STANDARDIZED_LEVELS = ("instance", "all")
MLKD_MASKS = ("sample", "batch_fraction")


@TERMS.register("mlkd", family="response")
class MLKDTerm(nn.Module):
    """Multi-level logit distillation, summed over several temperatures (Jin et al., CVPR 2023).

    Without augmentation, on the one view the trainer gives:
        loss = sum_T [instance_weight * instance(T) + batch_weight * batch(T) + class_weight * class(T)]
    With `augment` (the paper's prediction augmentation) the trainer adds a strong view of every image
    (kdrun/data/strong_view.py) and
        loss = sum_T [instance_weight * (instance_weak(T, masked) + instance_strong(T))
                      + batch_weight * batch_weak(T, masked) + class_weight * class_weak(T, class-masked)]
    with the confidence masks of `confidence_masks`; the cross-entropy term then covers both views.
    These are the terms the authors' code adds up (its strong-view class and batch terms are computed
    but left out of the loss; its strong-view instance terms at T = 2 and 6 read the weak view's logits,
    which kdrun does not copy).
    `mask` says how the masks weigh the weak-view terms:
      - `sample` (default): sample by sample (and class by class), as the paper describes;
      - `batch_fraction`: the authors' code, which multiplies each unmasked batch-mean loss by the
        fraction of kept samples (classes for the class level): use it to reproduce their numbers.
    `logit_standardize` (Sun et al., CVPR 2024) z-scores the logits of the levels `standardize_levels`
    names: `instance` (default; the logit-standardization authors' MLKD standardizes the instance-level
    KL alone, on both views) or `all` (the three levels).
    As in the paper and its code, the temperatures are summed, so listing more of them weighs the term more.
    """

    needs_teacher = True
    takes_strong_view = True   # when built with augment=True

    def __init__(self, temperatures: Sequence[float] = (2.0, 3.0, 4.0, 5.0, 6.0),
                 instance_weight: float = 1.0, batch_weight: float = 1.0, class_weight: float = 1.0,
                 logit_standardize: bool = False, augment: bool = False, standardize_levels: str = "instance",
                 mask: str = "sample"):
        super().__init__()
        self.temperatures = tuple(float(T) for T in temperatures)
        if not self.temperatures or min(self.temperatures) <= 0:
            raise KdrunError(f"mlkd temperatures={list(temperatures)} must be a non-empty list of positive "
                             f"numbers, e.g. [2, 3, 4, 5, 6]")
        if standardize_levels not in MLKD_STANDARDIZED_LEVELS:
            raise KdrunError(f"distill.terms.mlkd.standardize_levels={standardize_levels!r} is not one of "
                             f"{', '.join(MLKD_STANDARDIZED_LEVELS)}: pass e.g. distill.terms.mlkd.standardize_levels=instance")
        if mask not in MLKD_MASKS:
            raise KdrunError(f"distill.terms.mlkd.mask={mask!r} is not one of {', '.join(MLKD_MASKS)}: "
                             f"pass e.g. distill.terms.mlkd.mask=sample")
        self.level_weights = (float(instance_weight), float(batch_weight), float(class_weight))
        self.logit_standardize = bool(logit_standardize)
        self.standardize_levels = standardize_levels
        self.mask = mask
        self.needs_strong_view = bool(augment)

    def _pairs(self, student: torch.Tensor, teacher: torch.Tensor):
        """((student, teacher) for the instance level, (student, teacher) for the batch and class levels)."""
        if not self.logit_standardize:
            return (student, teacher), (student, teacher)
        standardized = (standardize_logits(student), standardize_logits(teacher))
        return standardized, (standardized if self.standardize_levels == "all" else (student, teacher))

    def _levels(self, student: torch.Tensor, teacher: torch.Tensor, T: float,
                sample_mask: Optional[torch.Tensor] = None, class_mask: Optional[torch.Tensor] = None):
        """(instance, batch, class) at T, standardized as configured, masked per `mask`."""
        (s_inst, t_inst), (s_rel, t_rel) = self._pairs(student, teacher)
        per_sample = self.mask == "sample"
        instance = mlkd_levels(s_inst, t_inst, T, sample_mask if per_sample else None)[0]
        _, batch, classes = mlkd_levels(s_rel, t_rel, T, sample_mask if per_sample else None,
                                        class_mask if per_sample else None)
        if not per_sample and sample_mask is not None:
            kept, kept_classes = sample_mask.mean(), class_mask.mean()
            instance, batch, classes = instance * kept, batch * kept, classes * kept_classes
        return instance, batch, classes

    def forward(self, ctx: StepContext) -> torch.Tensor:
        if self.needs_strong_view:
            return self._augmented(ctx)
        total = 0.0
        for T in self.temperatures:
            levels = self._levels(ctx.student_logits, ctx.teacher_logits, T)
            total = total + sum(w * level for w, level in zip(self.level_weights, levels))
        return total

    def _augmented(self, ctx: StepContext) -> torch.Tensor:
        if ctx.student_logits_strong is None or ctx.teacher_logits_strong is None:
            raise KdrunError("mlkd with augment=true needs the strong view's logits, which this trainer did not "
                             "compute: pass distill.terms.mlkd.augment=false")
        sample_mask, class_mask = confidence_masks(ctx.teacher_logits)
        strong_student, strong_teacher = ctx.student_logits_strong, ctx.teacher_logits_strong
        if self.logit_standardize:   # the strong view has the instance level only: standardized in both modes
            strong_student, strong_teacher = standardize_logits(strong_student), standardize_logits(strong_teacher)
        w_instance, w_batch, w_class = self.level_weights
        total = 0.0
        for T in self.temperatures:
            instance, batch, classes = self._levels(ctx.student_logits, ctx.teacher_logits, T, sample_mask, class_mask)
            strong_instance = kd_divergence(strong_student, strong_teacher, T)
            total = total + w_instance * (instance + strong_instance) + w_batch * batch + w_class * classes
        return total

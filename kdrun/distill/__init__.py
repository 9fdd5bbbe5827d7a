"""Distillation losses: a weighted sum of small loss terms, each an nn.Module.

A method's config file lists its terms, e.g. for KD:
    terms: {ce: {type: ce, weight: 0.1}, kd: {type: kd, weight: 0.9, T: 4}}
Each `type` names a term class registered in kdrun.distill.registry.TERMS where it is defined (response.py,
feature.py, feature_review.py, relation.py, or any new module of this package: all are imported below).
"""
from __future__ import annotations

import importlib
import pkgutil
from typing import Any, Mapping, Optional

import torch
from torch import nn

from kdrun.distill.context import FeatureShapes, StepContext
from kdrun.distill.registry import TERMS, check_term, check_terms, takes_shapes
from kdrun.distill.response import CrossEntropyTerm
from kdrun.errors import KdrunError

# Every registered term type by name: the registry itself (kept under its old name for callers).
TERM_TYPES = TERMS


class DistillLoss(nn.Module):
    """Weighted sum of terms; terms with weight 0 are not computed at all."""

    def __init__(self, terms: Mapping[str, nn.Module], weights: Mapping[str, float]):
        super().__init__()
        self.terms = nn.ModuleDict({name: term for name, term in terms.items() if weights[name] != 0})
        self.weights = {name: float(weights[name]) for name in self.terms}

    @property
    def needs_teacher(self) -> bool:
        return self._asked("needs_teacher")

    @property
    def needs_features(self) -> bool:
        return self._asked("needs_features")

    @property
    def needs_strong_view(self) -> bool:
        return self._asked("needs_strong_view")

    @property
    def needs_head(self) -> bool:
        return self._asked("needs_head")

    @property
    def needs_class_means(self) -> bool:
        return self._asked("needs_class_means")

    def _asked(self, flag: str) -> bool:
        """Whether any weighted term sets this class attribute (needs_features, needs_head, ...)."""
        return any(getattr(term, flag, False) for term in self.terms.values())

    def set_class_means(self, means: torch.Tensor) -> None:
        """Give the teacher's class-mean embeddings (K, D) to the terms that asked for them."""
        for term in self.terms.values():
            if getattr(term, "needs_class_means", False):
                term.set_class_means(means)

    def forward(self, ctx: StepContext) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        values = {name: term(ctx) for name, term in self.terms.items()}
        total = sum(self.weights[name] * value for name, value in values.items())
        return total, values

    # The initialization phase (kdrun.engine.init_phase): terms with `init_epochs` > 0 and an `init_loss(ctx)`.
    @property
    def init_epochs(self) -> int:
        return max((int(getattr(term, "init_epochs", 0)) for term in self.terms.values()), default=0)

    @property
    def init_trains_student(self) -> bool:
        """Whether an init loss reaches the student (AB, FSP); if not (FT), the student stays in eval mode."""
        return any(getattr(term, "init_trains_student", False) for term in self._initialized(0).values())

    def init_lr(self, run_lr: float) -> float:
        """The initialization's constant learning rate: the first term's own `init_lr`, else the run's."""
        given = [term.init_lr for term in self._initialized(0).values() if getattr(term, "init_lr", None)]
        return float(given[0]) if given else float(run_lr)

    def init_forward(self, ctx: StepContext, init_epoch: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Unweighted sum of the init losses of the terms still initializing in `init_epoch` (0-based)."""
        values = {name: term.init_loss(ctx) for name, term in self._initialized(init_epoch).items()}
        return sum(values.values()), values

    def _initialized(self, init_epoch: int) -> dict[str, nn.Module]:
        return {name: term for name, term in self.terms.items() if getattr(term, "init_epochs", 0) > init_epoch}


def _term_specs(distill_cfg: Mapping[str, Any]) -> list[tuple[str, type[nn.Module], dict, float]]:
    """(name, class, options, weight) of every term, with one-line errors for unknown types and options."""
    specs = []
    for name, spec in distill_cfg["terms"].items():
        cls = check_term(name, spec)
        spec = dict(spec)
        spec.pop("type", None)
        weight = float(spec.pop("weight", 1.0))
        specs.append((name, cls, spec, weight))
    if all(weight == 0 for *_, weight in specs):
        raise KdrunError("every loss term has weight 0: give at least one distill term a positive weight")
    return specs


def needs_strong_view(distill_cfg: Mapping[str, Any]) -> bool:
    """Whether any weighted term asks for a strongly augmented second view (MLKD's `augment`)."""
    return any(weight and getattr(cls, "takes_strong_view", False) and bool(options.get("augment", False))
               for _, cls, options, weight in _term_specs(distill_cfg))


def _any_term(distill_cfg: Mapping[str, Any], flag: str) -> bool:
    return any(getattr(cls, flag, False) for _, cls, _, weight in _term_specs(distill_cfg) if weight)


def needs_features(distill_cfg: Mapping[str, Any]) -> bool:
    """Whether any weighted term reads intermediate features (decided before building models' taps)."""
    return _any_term(distill_cfg, "needs_features")


def needs_teacher_classifier(distill_cfg: Mapping[str, Any]) -> bool:
    """Whether any weighted term passes features through the teacher's classifier (SRD)."""
    return _any_term(distill_cfg, "needs_teacher_classifier")


def wants_pre_relu(distill_cfg: Mapping[str, Any]) -> bool:
    """Whether any weighted term distills the maps before the activation, where models offer them (OFD)."""
    return _any_term(distill_cfg, "wants_pre_relu")


def needs_head(distill_cfg: Mapping[str, Any]) -> bool:
    """Whether any weighted term reads the models' final maps or heads (kdrun.models.head)."""
    return _any_term(distill_cfg, "needs_head")


def build_loss(distill_cfg: Mapping[str, Any], shapes: Optional[FeatureShapes] = None) -> DistillLoss:
    """The weighted terms of a method config; terms with learnable parts are built for `shapes`."""
    terms, weights = {}, {}
    for name, cls, options, weight in _term_specs(distill_cfg):
        if weight == 0:
            continue
        if takes_shapes(cls):
            if shapes is None:
                raise KdrunError(f"distill.terms.{name} needs feature shapes; build the loss through kdrun's "
                                 "runner, which measures them")
            options = {**options, "shapes": shapes}
        try:
            terms[name] = cls(**options)
        except TypeError as error:
            raise KdrunError(f"bad options for distill.terms.{name}: {error}") from error
        weights[name] = weight
    return DistillLoss(terms, weights)


def hard_label_loss() -> DistillLoss:
    """Plain cross-entropy, for the teacher and the baseline stages."""
    return DistillLoss({"ce": CrossEntropyTerm()}, {"ce": 1.0})


def _load_term_modules() -> None:
    """Import every module of this package, so that each term class registers itself (no list to extend)."""
    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")


_load_term_modules()

__all__ = ["DistillLoss", "FeatureShapes", "StepContext", "TERMS", "TERM_TYPES", "build_loss", "check_terms",
           "hard_label_loss", "needs_features", "needs_head", "needs_strong_view", "needs_teacher_classifier",
           "wants_pre_relu"]

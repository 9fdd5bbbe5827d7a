"""Distillation losses: a weighted sum of small loss terms, each an nn.Module.

A method's config file lists its terms, e.g. for KD:
    terms: {ce: {type: ce, weight: 0.1}, kd: {type: kd, weight: 0.9, T: 4}}
"""
from __future__ import annotations

import difflib
from typing import Any, Mapping

import torch
from torch import nn

from kdrun.distill.context import StepContext
from kdrun.distill.response import CrossEntropyTerm, DISTTerm, DKDTerm, KDTerm, MLKDTerm
from kdrun.errors import KdrunError

TERM_TYPES: dict[str, type[nn.Module]] = {
    "ce": CrossEntropyTerm,
    "kd": KDTerm,
    "dkd": DKDTerm,
    "dist": DISTTerm,
    "mlkd": MLKDTerm,
}


class DistillLoss(nn.Module):
    """Weighted sum of terms; terms with weight 0 are not computed at all."""

    def __init__(self, terms: Mapping[str, nn.Module], weights: Mapping[str, float]):
        super().__init__()
        self.terms = nn.ModuleDict({name: term for name, term in terms.items() if weights[name] != 0})
        self.weights = {name: float(weights[name]) for name in self.terms}

    @property
    def needs_teacher(self) -> bool:
        return any(getattr(term, "needs_teacher", False) for term in self.terms.values())

    def forward(self, ctx: StepContext) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        values = {name: term(ctx) for name, term in self.terms.items()}
        total = sum(self.weights[name] * value for name, value in values.items())
        return total, values


def build_loss(distill_cfg: Mapping[str, Any]) -> DistillLoss:
    terms, weights = {}, {}
    for name, spec in distill_cfg["terms"].items():
        spec = dict(spec)
        kind = spec.pop("type", name)
        weight = spec.pop("weight", 1.0)
        if kind not in TERM_TYPES:
            close = difflib.get_close_matches(kind, TERM_TYPES, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise KdrunError(f"unknown loss term type '{kind}' in distill.terms.{name}: "
                             f"choose one of {', '.join(sorted(TERM_TYPES))}{hint}")
        try:
            terms[name] = TERM_TYPES[kind](**spec)
        except TypeError as error:
            raise KdrunError(f"bad options for distill.terms.{name} ({kind}): {error}") from error
        weights[name] = float(weight)
    if all(w == 0 for w in weights.values()):
        raise KdrunError("every loss term has weight 0: give at least one distill term a positive weight")
    return DistillLoss(terms, weights)


def hard_label_loss() -> DistillLoss:
    """Plain cross-entropy, for the teacher and the baseline stages."""
    return DistillLoss({"ce": CrossEntropyTerm()}, {"ce": 1.0})


__all__ = ["DistillLoss", "StepContext", "build_loss", "hard_label_loss", "TERM_TYPES"]

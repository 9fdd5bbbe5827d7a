"""Feature taps for timm models, through timm's own ``forward_intermediates``.

One call gives the backbone's final features and the chosen intermediates (the stages listed
in ``model.feature_info``); the head then runs once on those final features.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from kdrun.models.features_common import FeatureTaps, as_vector, pick_indices


def has_forward_intermediates(model: nn.Module) -> bool:
    return callable(getattr(model, "forward_intermediates", None)) and callable(getattr(model, "forward_head", None))


def timm_stage_names(model: nn.Module) -> list[str]:
    """The module names of ``feature_info``: index i is intermediate i of forward_intermediates."""
    return [str(info["module"]) for info in getattr(model, "feature_info", None) or []]


def timm_tracer_kwargs() -> dict:
    """What timm's own FX feature extraction passes to torchvision's tracer (its leaf modules
    and wrapped functions), for timm models that must go through FX."""
    from timm.layers import get_notrace_functions, get_notrace_modules

    return {"leaf_modules": list(get_notrace_modules()), "autowrap_functions": list(get_notrace_functions())}


class TimmTaps(FeatureTaps):
    """``forward_intermediates`` for the maps, ``forward_head`` for the embedding and logits."""

    def __init__(self, model: nn.Module, model_name: str, indices: list[int] | None, names: Sequence[str],
                 role: str) -> None:
        super().__init__(model, model_name, names, role)
        self._indices = indices  # None: every intermediate (a model without feature_info)
        self._split_head = False

    def _calibrate(self, x: Tensor) -> None:
        final, intermediates = self.model.forward_intermediates(x, indices=self._indices, intermediates_only=False)
        if not self.names:  # no feature_info: name the intermediates by index
            self.names = [str(i) for i in range(len(intermediates))]
        self._split_head = _classifier_follows_pre_logits(self.model, final)

    def _tap(self, x: Tensor) -> tuple[Tensor, list[Tensor], Tensor]:
        final, maps = self.model.forward_intermediates(x, indices=self._indices, intermediates_only=False)
        embedding = self.model.forward_head(final, pre_logits=True)
        if self._split_head:
            logits = self.model.get_classifier()(embedding)
        else:
            # The head cannot be split: run it again for the logits (only the head, not the backbone).
            logits = self.model.forward_head(final)
        return logits, list(maps), as_vector(embedding)


def _classifier_follows_pre_logits(model: nn.Module, final: Tensor) -> bool:
    """Whether logits == get_classifier()(forward_head(final, pre_logits=True)), as for nearly
    every timm model; then the head runs once, so BatchNorm in a head (MobileNetV4) updates once.
    Not so for heads returning a tuple, distilled models (two classifiers) and the like."""
    classifier = model.get_classifier() if callable(getattr(model, "get_classifier", None)) else None
    if not isinstance(classifier, nn.Module):
        return False
    try:
        split = classifier(model.forward_head(final, pre_logits=True))
    except Exception:  # e.g. a conv classifier that wants the map pre_logits has flattened
        return False
    full = model.forward_head(final)
    return isinstance(full, Tensor) and split.shape == full.shape and torch.allclose(split, full, rtol=1e-4, atol=1e-5)


def timm_indices(model: nn.Module, model_name: str, layers: Sequence[str] | None, role: str
                 ) -> tuple[list[int] | None, list[str]]:
    """(indices for forward_intermediates, their names), shallow to deep.

    A layer is a feature_info module name or its index (negative counts from the end);
    forward_intermediates returns maps in depth order, so the names are sorted that way too.
    """
    names = timm_stage_names(model)
    if layers is None:
        return (list(range(len(names))) if names else None), names
    indices = pick_indices(names, layers, model_name, role)
    return indices, [names[i] for i in indices]

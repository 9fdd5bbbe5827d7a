"""A model's classifier as a module of its own: the layer that maps the tapped embedding to the logits.

SRD (kdrun.distill.srd) passes the student's adapted features through the teacher's classifier. The
module is found per kind of tap (the CIFAR nets' last head layer, timm's ``get_classifier()`` where the
head splits, the Linear that the FX graph feeds with the embedding) and checked once on a dummy batch:
it must turn the tapped embedding into the model's own logits.
"""
from __future__ import annotations

import torch
from torch import nn

from kdrun.errors import KdrunError
from kdrun.models.features_common import FeatureTaps, dummy_batch, eval_mode


def _candidate(taps: FeatureTaps) -> nn.Module | None:
    from kdrun.models.features import CifarTaps          # here: features imports this package's modules
    from kdrun.models.features_fx import FxTaps
    from kdrun.models.features_timm import TimmTaps

    if isinstance(taps, CifarTaps):
        return taps.model.head[-1]
    if isinstance(taps, TimmTaps) and taps._split_head:
        return taps.model.get_classifier()
    if isinstance(taps, FxTaps) and taps._spec.classifier is not None:
        return taps.model.get_submodule(taps._spec.classifier)
    return None


def tapped_classifier(taps: FeatureTaps, input_shape: tuple[int, int, int]) -> nn.Module:
    """The module with ``module(embedding) == logits`` for ``taps``, or one line saying there is none."""
    classifier = _candidate(taps)
    if classifier is not None:
        x = dummy_batch(taps.model, input_shape)
        with torch.no_grad(), eval_mode(taps.model):
            logits, _, embedding = taps(x)
            split = classifier(embedding)
        if split.shape == logits.shape and torch.allclose(split, logits, rtol=1e-4, atol=1e-5):
            return classifier
    raise KdrunError(f"{taps.role} '{taps.model_name}' has no classifier layer that maps its embedding to its "
                     f"logits, which this method reuses: pick a {taps.role} whose head ends in one Linear layer "
                     "(e.g. a ResNet)")

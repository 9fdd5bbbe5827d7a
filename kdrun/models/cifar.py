"""CIFAR-style networks of the knowledge-distillation literature's CIFAR-100 tables.

The architectures (and their parameter counts) follow those used by RepDistiller / CRD
(Tian et al., "Contrastive Representation Distillation", ICLR 2020) and mdistiller; this
is an independent implementation of them:

- ``resnet{8,14,20,32,44,56,110}``, ``resnet8x4``, ``resnet32x4``: He et al., "Deep Residual
  Learning for Image Recognition", CVPR 2016.
- ``wrn_{16,40}_{1,2}``: Zagoruyko & Komodakis, "Wide Residual Networks", BMVC 2016.
- ``vgg{8,11,13}`` (with BatchNorm): Simonyan & Zisserman, "Very Deep Convolutional Networks
  for Large-Scale Image Recognition", ICLR 2015.
- ``mobilenetv2`` (width 0.5): Sandler et al., "MobileNetV2: Inverted Residuals and Linear
  Bottlenecks", CVPR 2018.
- ``shufflenetv1`` / ``shufflenetv2``: Zhang et al., "ShuffleNet", CVPR 2018 / Ma et al.,
  "ShuffleNet V2", ECCV 2018.

Every model takes inputs of any size from 8x8 and any number of channels, returns logits
from ``forward`` and, from ``forward_features_list``, the stem's and each stage's output,
described by its ``feature_channels`` and ``feature_reductions`` attributes (see
:class:`kdrun.models.cifar_common.CifarNet`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from kdrun.errors import KdrunError
from kdrun.models.cifar_common import CifarNet
from kdrun.models.cifar_mobile import mobilenetv2, shufflenetv1, shufflenetv2
from kdrun.models.cifar_resnet import (
    resnet8,
    resnet8x4,
    resnet14,
    resnet20,
    resnet32,
    resnet32x4,
    resnet44,
    resnet56,
    resnet110,
    wrn_16_1,
    wrn_16_2,
    wrn_40_1,
    wrn_40_2,
)
from kdrun.models.cifar_vgg import vgg8, vgg11, vgg13

__all__ = ["CIFAR_MODELS", "CifarNet", "create_cifar_model"]

CIFAR_MODELS: dict[str, Callable[..., nn.Module]] = {
    "resnet8": resnet8,
    "resnet14": resnet14,
    "resnet20": resnet20,
    "resnet32": resnet32,
    "resnet44": resnet44,
    "resnet56": resnet56,
    "resnet110": resnet110,
    "resnet8x4": resnet8x4,
    "resnet32x4": resnet32x4,
    "wrn_16_1": wrn_16_1,
    "wrn_16_2": wrn_16_2,
    "wrn_40_1": wrn_40_1,
    "wrn_40_2": wrn_40_2,
    "vgg8": vgg8,
    "vgg11": vgg11,
    "vgg13": vgg13,
    "mobilenetv2": mobilenetv2,
    "shufflenetv1": shufflenetv1,
    "shufflenetv2": shufflenetv2,
}


def create_cifar_model(name: str, num_classes: int, in_chans: int, **options: Any) -> nn.Module:
    """Build the CIFAR model called ``name`` (a key of ``CIFAR_MODELS``).

    ``options`` exists only so that the generic factory can pass its extra keyword arguments
    through; the CIFAR models have none, so any is reported as a user error.
    """
    if name not in CIFAR_MODELS:
        raise KdrunError(f"unknown CIFAR model {name!r}; choose one of: {', '.join(CIFAR_MODELS)}")
    if num_classes < 1 or in_chans < 1:
        raise KdrunError(
            f"CIFAR model {name!r} needs num_classes >= 1 and in_chans >= 1, got {num_classes} and {in_chans}"
        )
    if options:
        raise KdrunError(
            f"CIFAR model {name!r} takes no extra options, got {', '.join(sorted(options))}: remove them"
        )
    return CIFAR_MODELS[name](num_classes=num_classes, in_chans=in_chans)

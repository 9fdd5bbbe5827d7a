"""Pre-ReLU feature maps of kdrun's CIFAR ResNets and WRNs, and the BatchNorm that feeds each ReLU.

OFD (Heo et al., ICCV 2019) distills the maps *before* the activation, where the teacher's negative
responses are still visible, and bounds them by a margin read off the BatchNorm in front of that ReLU.
Both depend on the network's layout, so only the families the authors distilled are covered:

- ResNet (post-activation blocks): a stage's map is its last block's sum ``body(x) + shortcut(x)``, before
  the block's ReLU; the stem's is its conv + BN output. The BN is the one that ends that block's body
  (the reference codes' ``get_bn_before_relu``), and the stem's own.
- WRN (pre-activation blocks): every stage output is already pre-ReLU; the BN is the next one applied
  to it (the next stage's first ``bn1``, the head's BN after the last stage).
Other models return None: their maps are distilled as tapped.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from kdrun.models.cifar_common import CifarNet
from kdrun.models.cifar_resnet import CifarResNet, CifarWideResNet


def has_pre_relu_maps(model: nn.Module) -> bool:
    return isinstance(model, (CifarResNet, CifarWideResNet))


def forward_pre_relu(model: CifarNet, x: Tensor) -> tuple[Tensor, list[Tensor], Tensor]:
    """(logits, pre-ReLU stem and stage maps, embedding), one pass, same outputs as ``forward_with_features``."""
    if isinstance(model, CifarWideResNet):  # already pre-activation
        return model.forward_with_features(x)
    # conv_bn(relu=True) is (conv, BN, inplace ReLU): keep the BN output, activate a copy.
    pre = model.stem[1](model.stem[0](x))
    maps, x = [pre], torch.relu(pre)
    for stage in model.stages:
        x = stage[:-1](x)
        block = stage[-1]
        pre = block.body(x) + block.shortcut(x)
        maps.append(pre)
        x = torch.relu(pre)
    embedding = model.head[:-1](x)
    return model.head[-1](embedding), maps, embedding


def bn_before_relu(model: CifarNet) -> list[nn.BatchNorm2d]:
    """For the stem and each stage, the BatchNorm whose output (plus the shortcut) the ReLU receives."""
    if isinstance(model, CifarWideResNet):
        return [stage[0].bn1 for stage in model.stages] + [model.head[0]]
    return [model.stem[1]] + [stage[-1].body[1][1] for stage in model.stages]

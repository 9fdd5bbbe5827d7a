"""CIFAR VGG with BatchNorm (Simonyan & Zisserman, "Very Deep Convolutional Networks for
Large-Scale Image Recognition", ICLR 2015), in the form RepDistiller (Tian et al., ICLR 2020)
uses: five conv blocks and a single linear classifier instead of the 4096-wide FC stack.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from kdrun.models.cifar_common import CifarNet, classifier, conv_bn

# Widths of the 3x3 convs in each of the five blocks.
_CONFIGS: dict[str, list[list[int]]] = {
    "vgg8": [[64], [128], [256], [512], [512]],
    "vgg11": [[64], [128], [256, 256], [512, 512], [512, 512]],
    "vgg13": [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
}


def _block(cin: int, widths: Sequence[int]) -> list[nn.Module]:
    layers: list[nn.Module] = []
    for w in widths:
        # The bias before BN is redundant, but the reference has it and it counts in the
        # published parameter numbers.
        layers.append(conv_bn(cin, w, 3, bias=True))
        cin = w
    return layers


class CifarVGG(CifarNet):
    """Block 0 is the stem; blocks 1-3 each start with a 2x2 max-pool. Block 4 runs at the
    resolution of block 3, as in RepDistiller for 32x32 inputs, so that the net does not
    shrink a CIFAR image to 2x2 before its last block."""

    def __init__(self, config: Sequence[Sequence[int]], num_classes: int = 100, in_chans: int = 3) -> None:
        blocks, cin = [], in_chans
        for widths in config:
            blocks.append(_block(cin, widths))
            cin = widths[-1]
        stem = nn.Sequential(*blocks[0])
        stages = [nn.Sequential(nn.MaxPool2d(2), *b) for b in blocks[1:4]]
        stages.append(nn.Sequential(*blocks[4]))
        super().__init__(stem, stages, classifier(cin, num_classes), [b[-1] for b in config], [1, 2, 4, 8, 8])


def vgg8(num_classes: int = 100, in_chans: int = 3) -> CifarVGG:
    return CifarVGG(_CONFIGS["vgg8"], num_classes, in_chans)


def vgg11(num_classes: int = 100, in_chans: int = 3) -> CifarVGG:
    return CifarVGG(_CONFIGS["vgg11"], num_classes, in_chans)


def vgg13(num_classes: int = 100, in_chans: int = 3) -> CifarVGG:
    return CifarVGG(_CONFIGS["vgg13"], num_classes, in_chans)

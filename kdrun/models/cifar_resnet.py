"""CIFAR ResNets and Wide ResNets.

- ResNet: He et al., "Deep Residual Learning for Image Recognition", CVPR 2016 (the
  6n+2-layer CIFAR networks of its section 4.2), with the ``x4`` widened variants of
  RepDistiller (Tian et al., ICLR 2020).
- WRN: Zagoruyko & Komodakis, "Wide Residual Networks", BMVC 2016.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from kdrun.models.cifar_common import CifarNet, classifier, conv_bn


class BasicBlock(nn.Module):
    """Post-activation residual block: two 3x3 convolutions, ReLU after the sum."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(conv_bn(cin, cout, 3, stride), conv_bn(cout, cout, 3, relu=False))
        # A 1x1 projection only where the shape changes (the paper's option B, as RepDistiller
        # does); elsewhere the identity.
        if stride == 1 and cin == cout:
            self.shortcut: nn.Module = nn.Identity()
        else:
            self.shortcut = conv_bn(cin, cout, 1, stride, relu=False)

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(self.body(x) + self.shortcut(x))


class PreActBlock(nn.Module):
    """Pre-activation block of the WRN paper: BN-ReLU-conv, twice, then the sum."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = None if stride == 1 and cin == cout else nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        pre = torch.relu(self.bn1(x))
        out = self.conv2(torch.relu(self.bn2(self.conv1(pre))))
        # As in the reference WRN code: a projection shortcut reads the pre-activated input,
        # the identity shortcut the raw one.
        return out + (x if self.shortcut is None else self.shortcut(pre))


def _stage(block: Callable[[int, int, int], nn.Module], cin: int, cout: int, n: int, stride: int) -> nn.Sequential:
    """``n`` blocks; only the first changes width and resolution."""
    return nn.Sequential(*(block(cin if i == 0 else cout, cout, stride if i == 0 else 1) for i in range(n)))


class CifarResNet(CifarNet):
    """Stem conv, then 3 stages of n basic blocks each (depth 6n+2); stages 2 and 3 halve
    the resolution. ``widths`` is (stem, stage1, stage2, stage3)."""

    def __init__(self, depth: int, widths: Sequence[int], num_classes: int = 100, in_chans: int = 3) -> None:
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 with n >= 1, got {depth}")
        n = (depth - 2) // 6
        stem = conv_bn(in_chans, widths[0], 3)
        stages = [
            _stage(BasicBlock, cin, cout, n, 1 if i == 0 else 2)
            for i, (cin, cout) in enumerate(zip(widths[:-1], widths[1:]))
        ]
        super().__init__(stem, stages, classifier(widths[-1], num_classes), widths, [1, 1, 2, 4])


class CifarWideResNet(CifarNet):
    """WRN-depth-k: stem conv, then 3 stages of n pre-activation blocks (depth 6n+4) of
    widths 16k, 32k, 64k."""

    def __init__(self, depth: int, widen: int, num_classes: int = 100, in_chans: int = 3) -> None:
        if depth < 10 or (depth - 4) % 6:
            raise ValueError(f"WRN depth must be 6n+4 with n >= 1, got {depth}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen, 32 * widen, 64 * widen]
        # No BN/ReLU on the stem: the first pre-activation block applies them.
        stem = nn.Conv2d(in_chans, widths[0], 3, 1, 1, bias=False)
        stages = [
            _stage(PreActBlock, cin, cout, n, 1 if i == 0 else 2)
            for i, (cin, cout) in enumerate(zip(widths[:-1], widths[1:]))
        ]
        # The last block's output is not yet activated, so the head starts with BN-ReLU.
        head = classifier(widths[-1], num_classes, nn.BatchNorm2d(widths[-1]), nn.ReLU(inplace=True))
        super().__init__(stem, stages, head, widths, [1, 1, 2, 4])


_NARROW = (16, 16, 32, 64)  # He et al.'s CIFAR widths
_WIDE = (32, 64, 128, 256)  # RepDistiller's "x4" widths (the stem only doubles)


def resnet8(num_classes: int = 100, in_chans: int = 3) -> CifarResNet:
    return CifarResNet(8, _NARROW, num_classes, in_chans)


def resnet14(num_classes: int = 100, in_chans: int = 3) -> CifarResNet:
    return CifarResNet(14, _NARROW, num_classes, in_chans)


def resnet20(num_classes: int = 100, in_chans: int = 3) -> CifarResNet:
    return CifarResNet(20, _NARROW, num_classes, in_chans)


def resnet32(num_classes: int = 100, in_chans: int = 3) -> CifarResNet:
    return CifarResNet(32, _NARROW, num_classes, in_chans)


def resnet44(num_classes: int = 100, in_chans: int = 3) -> CifarResNet:
    return CifarResNet(44, _NARROW, num_classes, in_chans)


def resnet56(num_classes: int = 100, in_chans: int = 3) -> CifarResNet:
    return CifarResNet(56, _NARROW, num_classes, in_chans)


def resnet110(num_classes: int = 100, in_chans: int = 3) -> CifarResNet:
    return CifarResNet(110, _NARROW, num_classes, in_chans)


def resnet8x4(num_classes: int = 100, in_chans: int = 3) -> CifarResNet:
    return CifarResNet(8, _WIDE, num_classes, in_chans)


def resnet32x4(num_classes: int = 100, in_chans: int = 3) -> CifarResNet:
    return CifarResNet(32, _WIDE, num_classes, in_chans)


def wrn_16_1(num_classes: int = 100, in_chans: int = 3) -> CifarWideResNet:
    return CifarWideResNet(16, 1, num_classes, in_chans)


def wrn_16_2(num_classes: int = 100, in_chans: int = 3) -> CifarWideResNet:
    return CifarWideResNet(16, 2, num_classes, in_chans)


def wrn_40_1(num_classes: int = 100, in_chans: int = 3) -> CifarWideResNet:
    return CifarWideResNet(40, 1, num_classes, in_chans)


def wrn_40_2(num_classes: int = 100, in_chans: int = 3) -> CifarWideResNet:
    return CifarWideResNet(40, 2, num_classes, in_chans)

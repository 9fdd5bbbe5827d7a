"""CIFAR variants of the mobile networks used as students in RepDistiller (Tian et al., ICLR 2020).

- MobileNetV2: Sandler et al., "MobileNetV2: Inverted Residuals and Linear Bottlenecks",
  CVPR 2018; width multiplier 0.5 (RepDistiller's ``mobile_half``).
- ShuffleNetV1: Zhang et al., "ShuffleNet: An Extremely Efficient Convolutional Neural
  Network for Mobile Devices", CVPR 2018; 3 groups.
- ShuffleNetV2: Ma et al., "ShuffleNet V2: Practical Guidelines for Efficient CNN
  Architecture Design", ECCV 2018; the 1x net.

The CIFAR variants keep more resolution than the ImageNet ones: the ShuffleNets use a 1x1,
stride-1 stem without max-pool, and MobileNetV2's second group of blocks has stride 1.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from kdrun.models.cifar_common import CifarNet, channel_shuffle, classifier, conv_bn


class InvertedResidual(nn.Module):
    """Expand (1x1), depthwise 3x3, project (1x1); residual when the shape allows."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        self.body = nn.Sequential(
            # Present even when expand == 1, as in RepDistiller's version.
            conv_bn(cin, hidden, 1),
            conv_bn(hidden, hidden, 3, stride, groups=hidden),
            # Linear bottleneck: no ReLU on the narrow output.
            conv_bn(hidden, cout, 1, relu=False),
        )
        self.residual = stride == 1 and cin == cout

    def forward(self, x: Tensor) -> Tensor:
        out = self.body(x)
        return x + out if self.residual else out


# (expansion, width, blocks, stride of the first block) for each group of blocks.
_MBV2_GROUPS = [(1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]
# Which groups make up each stage whose output forward_features_list returns (RepDistiller's f1-f4).
_MBV2_STAGES = [(0, 1), (2,), (3, 4), (5, 6)]


class CifarMobileNetV2(CifarNet):
    def __init__(self, width_mult: float = 0.5, num_classes: int = 100, in_chans: int = 3) -> None:
        cin = int(32 * width_mult)
        stem = conv_bn(in_chans, cin, 3, stride=2)
        groups, group_strides = [], []
        for t, c, n, s in _MBV2_GROUPS:
            cout = int(c * width_mult)
            blocks = []
            for i in range(n):
                blocks.append(InvertedResidual(cin, cout, s if i == 0 else 1, t))
                cin = cout
            groups.append((blocks, cout))
            group_strides.append(s)
        stages, channels, reductions = [], [int(32 * width_mult)], [2]
        for members in _MBV2_STAGES:
            stages.append(nn.Sequential(*(b for g in members for b in groups[g][0])))
            channels.append(groups[members[-1]][1])
            reductions.append(reductions[-1] * max(group_strides[g] for g in members))
        # The 1x1 conv to 1280 channels is not narrowed for width_mult <= 1 (as in the paper).
        last = 1280 if width_mult <= 1.0 else int(1280 * width_mult)
        super().__init__(stem, stages, classifier(last, num_classes, conv_bn(cin, last, 1)), channels, reductions)


class ShuffleV1Unit(nn.Module):
    """1x1 group conv, channel shuffle, 3x3 depthwise, 1x1 group conv; added to the input,
    or at stride 2 concatenated with the 3x3-average-pooled input."""

    def __init__(self, cin: int, cout: int, stride: int, groups: int, first_groups: int) -> None:
        super().__init__()
        # At stride 2 the pooled input supplies cin of the output channels; the branch the rest.
        branch_out = cout - cin if stride == 2 else cout
        mid = branch_out // 4
        self.first_groups = first_groups
        self.reduce = conv_bn(cin, mid, 1, groups=first_groups)
        # The ReLU after the depthwise conv follows RepDistiller (the paper has none there).
        self.depthwise = conv_bn(mid, mid, 3, stride, groups=mid)
        self.expand = conv_bn(mid, branch_out, 1, groups=groups, relu=False)
        self.pool = nn.AvgPool2d(3, 2, 1) if stride == 2 else None

    def forward(self, x: Tensor) -> Tensor:
        out = self.expand(self.depthwise(channel_shuffle(self.reduce(x), self.first_groups)))
        if self.pool is None:
            return torch.relu(out + x)
        return torch.relu(torch.cat([out, self.pool(x)], 1))


class CifarShuffleNetV1(CifarNet):
    def __init__(
        self,
        widths: tuple[int, ...] = (240, 480, 960),
        depths: tuple[int, ...] = (4, 8, 4),
        groups: int = 3,
        num_classes: int = 100,
        in_chans: int = 3,
    ) -> None:
        stem_width = 24
        stem = conv_bn(in_chans, stem_width, 1)
        stages, cin = [], stem_width
        for width, depth in zip(widths, depths):
            units = []
            for i in range(depth):
                # The first pointwise conv of the net is not grouped: its 24 input
                # channels are too few to split (Zhang et al., section 3.3).
                first_groups = 1 if cin == stem_width else groups
                units.append(ShuffleV1Unit(cin, width, 2 if i == 0 else 1, groups, first_groups))
                cin = width
            stages.append(nn.Sequential(*units))
        super().__init__(stem, stages, classifier(cin, num_classes), [stem_width, *widths], [1, 2, 4, 8])


class ShuffleV2Unit(nn.Module):
    """Stride 1: half of the channels pass through untouched, the other half go through the
    branch; the halves are then concatenated and shuffled."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        half = channels // 2
        self.branch = nn.Sequential(
            conv_bn(half, half, 1), conv_bn(half, half, 3, groups=half, relu=False), conv_bn(half, half, 1)
        )

    def forward(self, x: Tensor) -> Tensor:
        keep, work = x.chunk(2, dim=1)
        return channel_shuffle(torch.cat([keep, self.branch(work)], 1), 2)


class ShuffleV2DownUnit(nn.Module):
    """Stride 2: both halves of the output come from branches over the whole input."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        mid = cout // 2
        self.left = nn.Sequential(conv_bn(cin, cin, 3, 2, groups=cin, relu=False), conv_bn(cin, mid, 1))
        self.right = nn.Sequential(
            conv_bn(cin, mid, 1), conv_bn(mid, mid, 3, 2, groups=mid, relu=False), conv_bn(mid, mid, 1)
        )

    def forward(self, x: Tensor) -> Tensor:
        return channel_shuffle(torch.cat([self.left(x), self.right(x)], 1), 2)


class CifarShuffleNetV2(CifarNet):
    def __init__(
        self,
        widths: tuple[int, ...] = (116, 232, 464),
        depths: tuple[int, ...] = (3, 7, 3),
        last_width: int = 1024,
        num_classes: int = 100,
        in_chans: int = 3,
    ) -> None:
        stem_width = 24
        stem = conv_bn(in_chans, stem_width, 1)
        stages, cin = [], stem_width
        for width, depth in zip(widths, depths):
            # ``depth`` stride-1 units after the downsampling one, as RepDistiller counts them.
            stages.append(nn.Sequential(ShuffleV2DownUnit(cin, width), *(ShuffleV2Unit(width) for _ in range(depth))))
            cin = width
        head = classifier(last_width, num_classes, conv_bn(cin, last_width, 1))
        super().__init__(stem, stages, head, [stem_width, *widths], [1, 2, 4, 8])


def mobilenetv2(num_classes: int = 100, in_chans: int = 3) -> CifarMobileNetV2:
    return CifarMobileNetV2(0.5, num_classes=num_classes, in_chans=in_chans)


def shufflenetv1(num_classes: int = 100, in_chans: int = 3) -> CifarShuffleNetV1:
    return CifarShuffleNetV1(num_classes=num_classes, in_chans=in_chans)


def shufflenetv2(num_classes: int = 100, in_chans: int = 3) -> CifarShuffleNetV2:
    return CifarShuffleNetV2(num_classes=num_classes, in_chans=in_chans)

"""Pieces shared by the CIFAR-style networks in :mod:`kdrun.models.cifar`."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn


def conv_bn(
    cin: int,
    cout: int,
    kernel_size: int,
    stride: int = 1,
    groups: int = 1,
    relu: bool = True,
    bias: bool = False,
) -> nn.Sequential:
    """Conv -> BatchNorm (-> ReLU), padded so that stride 1 keeps the spatial size."""
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, kernel_size, stride, kernel_size // 2, groups=groups, bias=bias),
        nn.BatchNorm2d(cout),
    ]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


def classifier(in_features: int, num_classes: int, *before_pool: nn.Module) -> nn.Sequential:
    """Optional extra layers, global average pooling, then one linear layer.

    The reference code pools with a fixed window (8 or 4 pixels), which ties it to 32x32
    inputs; adaptive pooling gives the same result there and also works for 28x28 or 8x8.
    """
    return nn.Sequential(
        *before_pool, nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.Linear(in_features, num_classes)
    )


def channel_shuffle(x: Tensor, groups: int) -> Tensor:
    """Interleave the channels of ``groups`` groups (ShuffleNet), so that the next grouped
    convolution sees channels from every group."""
    if groups == 1:
        return x
    return x.unflatten(1, (groups, -1)).transpose(1, 2).flatten(1, 2)


class CifarNet(nn.Module):
    """A stem, a sequence of stages and a classification head.

    Every CIFAR model is this shape, so ``forward_features_list`` (the maps feature-based
    distillation losses compare) and ``forward`` are written once here.

    Attributes:
        feature_channels: channels of each map ``forward_features_list`` returns.
        feature_reductions: how much smaller than the input each of those maps is
            (a 32x32 input gives maps of 32 // r pixels a side).
    """

    def __init__(
        self,
        stem: nn.Module,
        stages: Sequence[nn.Module],
        head: nn.Module,
        feature_channels: Sequence[int],
        feature_reductions: Sequence[int],
    ) -> None:
        super().__init__()
        if not len(feature_channels) == len(feature_reductions) == len(stages) + 1:
            raise ValueError("need one feature channel count and reduction for the stem and each stage")
        self.stem = stem
        self.stages = nn.ModuleList(stages)
        self.head = head
        self.feature_channels = list(feature_channels)
        self.feature_reductions = list(feature_reductions)
        self._init_weights()

    def _init_weights(self) -> None:
        # He initialisation for the convolutions, as all the reference implementations do;
        # BatchNorm and Linear keep PyTorch's defaults (weight 1 / bias 0, and uniform).
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward_features_list(self, x: Tensor) -> list[Tensor]:
        """The output of the stem and of each stage (post-activation), in order."""
        features = [self.stem(x)]
        for stage in self.stages:
            features.append(stage(features[-1]))
        return features

    def forward_with_features(self, x: Tensor) -> tuple[Tensor, list[Tensor], Tensor]:
        """Logits, the ``forward_features_list`` maps and the embedding, from one pass.

        The embedding is the classifier's input: the pooled (and, for the mobile nets,
        widened) last map, of shape (batch, ``head[-1].in_features``).
        """
        features = self.forward_features_list(x)
        # Every head is ``classifier(...)``: pooling layers, then one Linear; split before it.
        embedding = self.head[:-1](features[-1])
        return self.head[-1](embedding), features, embedding

    def forward(self, x: Tensor) -> Tensor:
        """Logits of shape (batch, num_classes)."""
        return self.forward_with_features(x)[0]

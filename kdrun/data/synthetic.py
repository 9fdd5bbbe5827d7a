"""A tiny, deterministic, *learnable* image dataset for tests and smoke runs.

Each class gets a fixed random pattern: a coarse 4x4 grid per channel, smoothly upsampled to the
image size (so small convnets with pooling see it as easily as linear models). An image is its
class pattern plus Gaussian pixel noise, clipped to uint8. Classes are balanced; everything comes
from one torch.Generator seeded with `seed`, so two builds are identical. (torchvision's FakeData
is not used: its images are pure noise with random labels, so nothing could be learned from it.)
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn.functional as F

from kdrun.config.groups import SyntheticDataset
from kdrun.data.bundle import DataBundle, InMemoryDataset, channel_stats
from kdrun.data.options import read_options, require_int
from kdrun.data.registry import DATASETS

PATTERN_GRID = 4             # coarse cells per side of a class pattern
PATTERN_RANGE = (48, 208)    # pattern pixel values, away from the clipping ends
NOISE_STD = 64.0             # per-pixel noise: patterns stay separable but a model must average to see them


@DATASETS.register("synthetic", schema=SyntheticDataset)
def build_synthetic(cfg: Mapping[str, Any]) -> DataBundle:
    options = read_options("synthetic", cfg, SyntheticDataset)
    num_classes = require_int("num_classes", options["num_classes"], minimum=2)
    train_size = require_int("train_size", options["train_size"], minimum=1)
    test_size = require_int("test_size", options["test_size"], minimum=1)
    size = require_int("image_size", options["image_size"], minimum=1)
    in_chans = require_int("in_chans", options["in_chans"], minimum=1)
    seed = require_int("seed", options["seed"], minimum=0)

    generator = torch.Generator().manual_seed(seed)
    patterns = _class_patterns(num_classes, in_chans, size, generator)
    train_images, train_labels = _sample(patterns, train_size, generator)
    test_images, test_labels = _sample(patterns, test_size, generator)

    mean, std = channel_stats(train_images)
    return DataBundle(
        name="synthetic",
        train=InMemoryDataset(train_images, train_labels, mean, std),
        test=InMemoryDataset(test_images, test_labels, mean, std),
        num_classes=num_classes, in_chans=in_chans, image_size=(size, size),
        class_names=[f"class_{k}" for k in range(num_classes)], mean=mean, std=std)


def _class_patterns(num_classes: int, in_chans: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """Float patterns (K, C, size, size) in pixel units."""
    grid = min(PATTERN_GRID, size)
    low, high = PATTERN_RANGE
    coarse = low + (high - low) * torch.rand(num_classes, in_chans, grid, grid, generator=generator)
    return F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)


def _sample(patterns: torch.Tensor, count: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    num_classes = len(patterns)
    # Balanced labels (count // K per class, the rest spread over the first classes), in random order.
    labels = (torch.arange(count) % num_classes)[torch.randperm(count, generator=generator)]
    noise = NOISE_STD * torch.randn((count, *patterns.shape[1:]), generator=generator)
    images = (patterns[labels] + noise).round().clamp(0, 255).to(torch.uint8)
    return images, labels

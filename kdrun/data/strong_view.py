"""A strongly augmented second view of a training batch, made on the batch's device in whole-batch operations.

MLKD's prediction augmentation (Jin, Wang & Lin, CVPR 2023) trains on a weak view (the dataset's own
crop and flip) and a strong view of every image. The strong view here is the SimCLR-style recipe the
authors' code applies: random resized crop (scale 0.2-1, aspect 3/4-4/3), horizontal flip, colour
jitter (brightness, contrast, saturation 0.4, with probability 0.8) and grayscale (probability 0.2).
Hue jitter is left out (it needs an HSV round trip per pixel); one-channel images get brightness and
contrast only. It is made from the weak view, already normalized, so every data path (in-memory or
folder) gets it without a second pass over the files.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torchvision.ops import roi_align

# ITU-R 601 luma, as torchvision's rgb_to_grayscale.
LUMA = (0.299, 0.587, 0.114)


def random_resized_crop(pixels: torch.Tensor, scale: tuple[float, float] = (0.2, 1.0),
                        ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> torch.Tensor:
    """torchvision's RandomResizedCrop back to the input size, one box per image, bilinear, in one roi_align call."""
    batch, _, height, width = pixels.shape
    device = pixels.device
    area = torch.empty(batch, device=device).uniform_(*scale) * height * width
    log_ratio = torch.empty(batch, device=device).uniform_(math.log(ratio[0]), math.log(ratio[1]))
    box_w = torch.sqrt(area * torch.exp(log_ratio)).clamp(1.0, width)
    box_h = torch.sqrt(area / torch.exp(log_ratio)).clamp(1.0, height)
    left = torch.rand(batch, device=device) * (width - box_w)
    top = torch.rand(batch, device=device) * (height - box_h)
    boxes = torch.stack([torch.arange(batch, device=device, dtype=pixels.dtype), left, top, left + box_w,
                         top + box_h], dim=1).to(pixels.dtype)
    # aligned=True with one sample per output pixel at its centre: the whole-image box returns the image
    # unchanged; a crop is never larger than the image, so no output pixel needs averaging (no aliasing).
    return roi_align(pixels, boxes, output_size=(height, width), spatial_scale=1.0, sampling_ratio=1, aligned=True)


def _luma(pixels: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W) grayscale of RGB pixels; a one-channel image is its own."""
    if pixels.shape[1] != 3:
        return pixels.mean(dim=1, keepdim=True)
    weights = torch.tensor(LUMA, device=pixels.device, dtype=pixels.dtype).view(1, 3, 1, 1)
    return (pixels * weights).sum(dim=1, keepdim=True)


def _factor(batch: int, strength: float, device: torch.device) -> torch.Tensor:
    return torch.empty(batch, 1, 1, 1, device=device).uniform_(1 - strength, 1 + strength)


def color_jitter(pixels: torch.Tensor, strength: float = 0.4, probability: float = 0.8) -> torch.Tensor:
    """Brightness, contrast and saturation, each by a factor in [1 - s, 1 + s] per image, for a random subset."""
    batch, device = pixels.shape[0], pixels.device
    jittered = (pixels * _factor(batch, strength, device)).clamp(0, 1)                   # brightness
    mean_gray = _luma(jittered).mean(dim=(2, 3), keepdim=True)
    jittered = ((jittered - mean_gray) * _factor(batch, strength, device) + mean_gray).clamp(0, 1)  # contrast
    if pixels.shape[1] == 3:
        gray = _luma(jittered)
        jittered = ((jittered - gray) * _factor(batch, strength, device) + gray).clamp(0, 1)      # saturation
    chosen = torch.rand(batch, 1, 1, 1, device=device) < probability
    return torch.where(chosen, jittered, pixels)


def random_grayscale(pixels: torch.Tensor, probability: float = 0.2) -> torch.Tensor:
    if pixels.shape[1] != 3:
        return pixels
    chosen = torch.rand(pixels.shape[0], 1, 1, 1, device=pixels.device) < probability
    return torch.where(chosen, _luma(pixels).expand_as(pixels), pixels)


class StrongView:
    """Normalized batch in, normalized strong view out (same shape); randomness from torch's generator."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if self.mean.device != images.device:  # once, not a copy every step
            self.mean, self.std = self.mean.to(images.device), self.std.to(images.device)
        mean, std = self.mean, self.std
        pixels = (images.float() * std + mean).clamp(0, 1)  # back to the 0..1 pixel scale
        pixels = random_resized_crop(pixels)
        flipped = torch.rand(pixels.shape[0], 1, 1, 1, device=pixels.device) < 0.5
        pixels = torch.where(flipped, pixels.flip(-1), pixels)
        pixels = random_grayscale(color_jitter(pixels))
        return ((pixels - mean) / std).to(images.dtype)

    def __repr__(self) -> str:
        return "StrongView(resized crop 0.2-1, flip, colour jitter 0.4 p=0.8, grayscale p=0.2)"


def strong_view_for(loss, data) -> Optional[StrongView]:
    """The strong view a distillation loss asks for (kdrun.distill.DistillLoss), or None; `data`: a DataBundle."""
    return StrongView(data.mean, data.std) if loss.needs_strong_view else None

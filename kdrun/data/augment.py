"""Batch augmentations on uint8 tensors, for InMemoryDataset (no PIL, no per-sample Python)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


class RandomCropFlip:
    """torchvision's RandomCrop(size, padding=p) + RandomHorizontalFlip(), vectorized over a uint8
    batch (B, C, H, W): zero padding, an independent crop offset and coin flip per image.

    Randomness comes from torch's global generator on the batch's device, so torch.manual_seed
    makes it reproducible. A class (not a closure) so that datasets holding it can be pickled
    into DataLoader workers.
    """

    def __init__(self, padding: int = 4, flip: bool = True):
        self.padding = padding
        self.flip = flip

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        batch, _, height, width = images.shape
        device = images.device
        if self.padding > 0:
            pad = self.padding
            padded = F.pad(images, (pad, pad, pad, pad))
            top = torch.randint(0, 2 * pad + 1, (batch,), device=device)
            left = torch.randint(0, 2 * pad + 1, (batch,), device=device)
            # Every crop window as a view (B, C, 2p+1, 2p+1, H, W), then one window per image: a copy of
            # contiguous rows, several times faster than gathering pixel by pixel.
            windows = padded.unfold(2, height, 1).unfold(3, width, 1)
            images = windows[torch.arange(batch, device=device), :, top, left]
        if self.flip:
            flipped = torch.rand(batch, device=device) < 0.5
            images = torch.where(flipped[:, None, None, None], images.flip(-1), images)
        return images

    def __repr__(self) -> str:
        return f"RandomCropFlip(padding={self.padding}, flip={self.flip})"

"""ImageNet-style crops of whole uint8 batches on their device: the packed image-folder path's augmentation.

RandomResizedCropFlip is torchvision's RandomResizedCrop(size) (scale 0.08-1, aspect 3/4-4/3, its box
sampling: ten tries per image, then the centre crop of the clamped aspect) + RandomHorizontalFlip, one
box per image, all of them resized in one torchvision.ops.roi_align call on a GPU; CenterCrop is
torchvision's CenterCrop. Randomness comes from torch's global generator on the batch's device.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torchvision.ops import roi_align

SCALE = (0.08, 1.0)
RATIO = (3 / 4, 4 / 3)
ATTEMPTS = 10


def center_offsets(height: int, width: int, size: int) -> tuple[int, int]:
    """(top, left) of torchvision's CenterCrop (its rounding), for an image at least `size` on each side."""
    return int(round((height - size) / 2.0)), int(round((width - size) / 2.0))


class CenterCrop:
    """The centre size x size window of every image of a batch (a view: no copy)."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        top, left = center_offsets(images.shape[-2], images.shape[-1], self.size)
        return images[..., top:top + self.size, left:left + self.size]

    def __repr__(self) -> str:
        return f"CenterCrop({self.size})"


def sample_boxes(batch: int, height: int, width: int, device: torch.device) -> torch.Tensor:
    """(batch, 4) boxes (top, left, h, w) drawn as torchvision's RandomResizedCrop.get_params draws one."""
    area = height * width
    target = area * torch.empty(batch, ATTEMPTS, device=device).uniform_(*SCALE)
    aspect = torch.exp(torch.empty(batch, ATTEMPTS, device=device).uniform_(math.log(RATIO[0]), math.log(RATIO[1])))
    w = torch.round(torch.sqrt(target * aspect))
    h = torch.round(torch.sqrt(target / aspect))
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.to(torch.uint8).argmax(dim=1)  # the first try that fits, as the sequential loop takes it
    rows = torch.arange(batch, device=device)
    w, h = w[rows, first], h[rows, first]
    # No try fits: the whole image at the nearest allowed aspect, centred (torchvision's fallback).
    in_ratio = width / height
    if in_ratio < RATIO[0]:
        fallback_w, fallback_h = width, int(round(width / RATIO[0]))
    elif in_ratio > RATIO[1]:
        fallback_w, fallback_h = int(round(height * RATIO[1])), height
    else:
        fallback_w, fallback_h = width, height
    found = fits.any(dim=1)
    w = torch.where(found, w, torch.full_like(w, fallback_w))
    h = torch.where(found, h, torch.full_like(h, fallback_h))
    top = torch.floor(torch.rand(batch, device=device) * (height - h + 1))
    left = torch.floor(torch.rand(batch, device=device) * (width - w + 1))
    top = torch.where(found, top, torch.full_like(top, (height - fallback_h) // 2))
    left = torch.where(found, left, torch.full_like(left, (width - fallback_w) // 2))
    return torch.stack([top, left, h, w], dim=1)


def resize_boxes(images: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
    """Each image's box (top, left, h, w) resized to size x size, bilinear with antialiasing, as uint8: one
    roi_align call on a GPU; on a CPU torch's uint8 antialiased resize per image (its vectorized path, the
    one torchvision's tensor transforms use, several times faster there than roi_align in float)."""
    if images.device.type == "cpu":
        return resize_boxes_per_image(images, boxes, size)
    return resize_boxes_roi_align(images, boxes, size)


def resize_boxes_per_image(images: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
    out = torch.empty((images.shape[0], images.shape[1], size, size), dtype=torch.uint8, device=images.device)
    for i, (top, left, h, w) in enumerate(boxes.to(torch.int64).tolist()):
        window = images[i:i + 1, :, top:top + h, left:left + w]
        out[i] = F.interpolate(window, size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]
    return out


def resize_boxes_roi_align(images: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
    """aligned=True samples at pixel centres, as PIL's resize does; sampling_ratio=-1 averages
    ceil(box / size) samples per output pixel, so a shrinking box is smoothed as PIL's antialiasing does."""
    batch = images.shape[0]
    top, left, h, w = boxes.to(torch.float32).unbind(dim=1)
    rois = torch.stack([torch.arange(batch, device=images.device, dtype=torch.float32), left, top, left + w, top + h], 1)
    resized = roi_align(images.float(), rois, output_size=(size, size), spatial_scale=1.0, sampling_ratio=-1,
                        aligned=True)
    return resized.round_().clamp_(0, 255).to(torch.uint8)


class RandomResizedCropFlip:
    """torchvision's RandomResizedCrop(size) + RandomHorizontalFlip() over a uint8 batch (B, C, H, W)."""

    def __init__(self, size: int, flip: bool = True):
        self.size = size
        self.flip = flip

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        batch, _, height, width = images.shape
        out = resize_boxes(images, sample_boxes(batch, height, width, images.device), self.size)
        if self.flip:
            flipped = torch.rand(batch, device=images.device) < 0.5
            out = torch.where(flipped[:, None, None, None], out.flip(-1), out)
        return out

    def __repr__(self) -> str:
        return f"RandomResizedCropFlip(size={self.size}, scale={SCALE}, ratio=(3/4, 4/3), flip={self.flip})"

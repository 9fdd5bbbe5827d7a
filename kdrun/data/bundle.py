"""What every dataset builder returns (DataBundle) and the in-memory dataset most of them use."""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
from torch.utils.data import Dataset

# Items of every dataset: (normalized float image C x H x W, integer label, the item's position).
# The position lets the trainer look up per-sample data (e.g. cached teacher outputs).
Item = tuple[torch.Tensor, int, int]


@dataclass
class DataBundle:
    name: str
    train: Dataset            # items: Item; augmented when the dataset's `augment` is on
    test: Dataset             # items: Item; never augmented
    num_classes: int
    in_chans: int
    image_size: tuple[int, int]  # (H, W) of the tensors the model sees
    class_names: list[str]
    mean: tuple[float, ...]   # per-channel normalization applied to both splits (0..1 pixel scale)
    std: tuple[float, ...]
    val: Optional[Dataset] = None   # dataset.val_split > 0: held out of the training set, never augmented


def validation_set(bundle: DataBundle) -> Dataset:
    """The split that picks the best epoch: the held-out part of the training set, else the test split."""
    return bundle.val if bundle.val is not None else bundle.test


def describe(bundle: DataBundle) -> str:
    """One line for logs, e.g. 'mnist5k: 4000 train / 1000 test, 10 classes, 1x28x28'."""
    height, width = bundle.image_size
    held_out = f" / {len(bundle.val)} validation" if bundle.val is not None else ""
    return (f"{bundle.name}: {len(bundle.train)} train{held_out} / {len(bundle.test)} test, "
            f"{bundle.num_classes} classes, {bundle.in_chans}x{height}x{width}")


class InMemoryDataset(Dataset):
    """All images as one uint8 tensor (N, C, H, W) + int64 labels (N,), normalized on access with
    per-channel mean/std (given on the 0..1 scale, as torchvision's Normalize after ToTensor).

    Used for datasets that fit in memory so the trainer can batch them without per-sample Python:
    `batch(idx)` slices, augments and normalizes a whole batch at once. `augment`, if given, maps a
    uint8 batch (B, C, H, W) to an augmented uint8 batch of the same shape; `__getitem__` goes
    through `batch` too, so both paths always see the same pipeline.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, mean: Sequence[float], std: Sequence[float],
                 augment: Optional[Callable[[torch.Tensor], torch.Tensor]] = None):
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"images must be a uint8 tensor (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
        if labels.dim() != 1 or len(labels) != len(images):
            raise ValueError(f"labels must be a 1-D tensor of {len(images)} entries, got shape {tuple(labels.shape)}")
        channels = images.shape[1]
        if len(mean) != channels or len(std) != channels:
            raise ValueError(f"mean and std need {channels} values, got {len(mean)} and {len(std)}")
        self.images = images
        self.labels = labels.to(torch.int64)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.augment = augment
        # Folding /255 into the scale saves a pass over the batch: x = u8 * scale - shift.
        std_t = torch.tensor(self.std, dtype=torch.float32, device=images.device).view(1, -1, 1, 1)
        mean_t = torch.tensor(self.mean, dtype=torch.float32, device=images.device).view(1, -1, 1, 1)
        self._scale = 1.0 / (255.0 * std_t)
        self._shift = mean_t / std_t

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> Item:
        position = operator.index(i)
        if position < 0:
            position += len(self)
        if not 0 <= position < len(self):
            raise IndexError(f"index {i} out of range for a dataset of {len(self)} items")
        images, _, _ = self.batch(torch.tensor([position]))
        return images[0], int(self.labels[position]), position

    def batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Normalized float images (B, C, H, W), int64 labels (B,) and the indices (B,), on the
        device the images live on (see `to`)."""
        idx = torch.as_tensor(idx, dtype=torch.int64).to(self.images.device)
        images = self.images[idx]
        if self.augment is not None:
            images = self.augment(images)
        return images.float() * self._scale - self._shift, self.labels[idx], idx

    def to(self, device: torch.device | str) -> "InMemoryDataset":
        """The same dataset with its tensors on `device` (e.g. the GPU, so batches never cross PCIe)."""
        return InMemoryDataset(self.images.to(device), self.labels.to(device), self.mean, self.std, self.augment)


def channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 images (N, C, H, W) on the 0..1 scale."""
    pixels = images.transpose(0, 1).reshape(images.shape[1], -1).double() / 255.0
    std = pixels.std(dim=1).clamp_min(1e-3)  # a constant channel must not divide by zero
    return tuple(pixels.mean(dim=1).tolist()), tuple(std.tolist())

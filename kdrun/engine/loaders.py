"""Batches for training and evaluation.

Datasets that fit in memory (kdrun.data.InMemoryDataset) are sliced as whole tensors, without
per-sample Python; others go through a torch DataLoader. Shuffling depends only on (seed, epoch), so
an interrupted run that resumes at epoch k sees the same order as an uninterrupted one.

In a torchrun launch `batch_size` is the global batch: every process draws the same (seed, epoch)
order and takes its own slice of each global batch (`shard=(rank, world_size)`), so the slices are
disjoint and together make exactly the batch a single process would train on.
"""
from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import DataLoader, Dataset

from kdrun.data import InMemoryDataset
from kdrun.errors import KdrunError

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # images, labels, sample indices


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 100_003 + epoch)


class Batches:
    """An iterable over one epoch's batches, moved to `device`."""

    def __init__(self, dataset: Dataset, batch_size: int, device: torch.device, shuffle: bool = False,
                 seed: int = 0, epoch: int = 0, num_workers: int = 0, shard: tuple[int, int] = (0, 1)):
        self.dataset, self.batch_size, self.device = dataset, batch_size, device
        self.shuffle, self.seed, self.epoch, self.num_workers = shuffle, seed, epoch, num_workers
        self.rank, self.world_size = shard
        # A last training batch of one sample (per process) breaks BatchNorm; drop it (it is reshuffled next epoch).
        self.drop_last = shuffle and 0 < len(dataset) % batch_size < 2 * self.world_size

    def __len__(self) -> int:
        full, rest = divmod(len(self.dataset), self.batch_size)
        return full + (1 if rest and not self.drop_last else 0)

    def __iter__(self) -> Iterator[Batch]:
        if isinstance(self.dataset, InMemoryDataset):
            yield from self._tensor_batches()
        else:
            yield from self._loader_batches()

    def _order(self) -> torch.Tensor:
        n = len(self.dataset)
        if self.shuffle:
            return torch.randperm(n, generator=epoch_generator(self.seed, self.epoch))
        return torch.arange(n)

    def batch_indices(self, device: torch.device | None = None) -> list[torch.Tensor]:
        """This process's sample positions of every batch of the epoch (on `device`: one copy per epoch)."""
        order = self._order() if device is None else self._order().to(device)
        batches = list(order.split(self.batch_size))
        if self.drop_last and batches and len(batches[-1]) < self.batch_size:
            batches.pop()
        if self.world_size > 1:
            batches = [idx.tensor_split(self.world_size)[self.rank] for idx in batches]
        return batches

    def _tensor_batches(self) -> Iterator[Batch]:
        # Indices live where the images do (the GPU after on_device): no host-to-device copy per batch.
        for idx in self.batch_indices(self.dataset.images.device):
            images, labels, indices = self.dataset.batch(idx)
            yield _to(images, labels, indices, self.device)

    def _loader_batches(self) -> Iterator[Batch]:
        loader = DataLoader(
            self.dataset, batch_sampler=[idx.tolist() for idx in self.batch_indices()],
            generator=epoch_generator(self.seed + 7_919 * self.rank, self.epoch), num_workers=self.num_workers,
            pin_memory=self.device.type == "cuda", persistent_workers=False,
        )
        for images, labels, indices in loader:
            yield _to(images, labels, indices, self.device)


def check_batch_fits(batch_size: int, train_set: Dataset) -> None:
    if batch_size > len(train_set):
        raise KdrunError(f"batch_size={batch_size} is larger than the training set ({len(train_set)} images); "
                         f"pass batch_size={min(len(train_set), 128)} or smaller")


def on_device(dataset: Dataset, device: torch.device) -> Dataset:
    """An in-memory dataset moved to the GPU once, so batches are sliced and augmented there and never
    cross PCIe; anything else unchanged (a DataLoader moves its batches)."""
    if isinstance(dataset, InMemoryDataset) and device.type == "cuda" and dataset.images.device != device:
        return dataset.to(device)
    return dataset


def _to(images, labels, indices, device: torch.device) -> Batch:
    non_blocking = device.type == "cuda"
    return (images.to(device, non_blocking=non_blocking), torch.as_tensor(labels).to(device, non_blocking=non_blocking),
            torch.as_tensor(indices).to(device, non_blocking=non_blocking))

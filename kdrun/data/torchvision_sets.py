"""torchvision's CIFAR-10/100, MNIST and Fashion-MNIST, loaded whole into InMemoryDataset.

They fit in memory (CIFAR: 150 MB as uint8), so the trainer slices batches as tensors. CIFAR's
train augmentation (random crop 32 with padding 4 + horizontal flip) runs on those tensors in
batch (RandomCropFlip); MNIST-like sets are not augmented. Files are never fetched unless
`download` is true, and a missing or failed download is a one-line KdrunError saying where the
files are expected.
"""
from __future__ import annotations

import contextlib
import os
import socket
from dataclasses import dataclass
from functools import partial
from typing import Any, Iterator, Mapping

import numpy as np
import torch
from torchvision import datasets

from kdrun.config.groups import TorchvisionDataset
from kdrun.data.augment import RandomCropFlip
from kdrun.data.bundle import DataBundle, InMemoryDataset
from kdrun.data.options import absolute_path, read_options, require_bool
from kdrun.data.registry import DATASETS
from kdrun.errors import KdrunError, one_line

# Seconds any one network operation of a download may block, so a dead network fails instead of hanging.
DOWNLOAD_SOCKET_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class TorchvisionFamily:
    dataset_class: type
    mean: tuple[float, ...]  # standard per-channel statistics of the train split
    std: tuple[float, ...]
    crop_padding: int        # > 0: random crop with this padding + flip when augment is on; 0: no augmentation

    def expected_folder(self, root: str) -> str:
        """Where torchvision looks for the files under `root`."""
        if hasattr(self.dataset_class, "base_folder"):  # CIFAR: ROOT/cifar-10-batches-py
            return os.path.join(root, self.dataset_class.base_folder)
        return os.path.join(root, self.dataset_class.__name__, "raw")  # MNIST-like: ROOT/MNIST/raw


FAMILIES = {
    "cifar10": TorchvisionFamily(datasets.CIFAR10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), 4),
    "cifar100": TorchvisionFamily(datasets.CIFAR100, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), 4),
    "mnist": TorchvisionFamily(datasets.MNIST, (0.1307,), (0.3081,), 0),
    "fashion_mnist": TorchvisionFamily(datasets.FashionMNIST, (0.2860,), (0.3530,), 0),
}


def build_torchvision_dataset(name: str, cfg: Mapping[str, Any]) -> DataBundle:
    family = FAMILIES[name]
    options = read_options(name, cfg, TorchvisionDataset)
    download = require_bool("download", options["download"])
    augment = require_bool("augment", options["augment"])
    root = absolute_path(options["root"])

    train_source = _load_split(name, family, root, train=True, download=download)
    test_source = _load_split(name, family, root, train=False, download=download)
    train_images, train_labels = _as_tensors(train_source)
    test_images, test_labels = _as_tensors(test_source)

    crop_flip = RandomCropFlip(padding=family.crop_padding) if augment and family.crop_padding > 0 else None
    train = InMemoryDataset(train_images, train_labels, family.mean, family.std, augment=crop_flip)
    test = InMemoryDataset(test_images, test_labels, family.mean, family.std)
    _, channels, height, width = train_images.shape
    class_names = [str(c) for c in train_source.classes]
    return DataBundle(name=name, train=train, test=test, num_classes=len(class_names), in_chans=channels,
                      image_size=(height, width), class_names=class_names, mean=family.mean, std=family.std)


for _name in FAMILIES:  # cifar10, cifar100, mnist, fashion_mnist: one builder, one schema
    DATASETS.add(_name, partial(build_torchvision_dataset, _name), schema=TorchvisionDataset)


def _load_split(name: str, family: TorchvisionFamily, root: str, train: bool, download: bool):
    folder = family.expected_folder(root)
    try:
        # Files already in place never touch the network, whatever `download` says.
        return family.dataset_class(root, train=train, download=False)
    except RuntimeError as err:  # torchvision's "Dataset not found or corrupted"
        if not download:
            raise KdrunError(
                f"{name} files not found (or failing their checksum) in {folder}: pass dataset.download=true "
                f"to fetch them, put the files at {folder}, or set dataset.root=PATH to the folder that "
                f"holds {os.path.relpath(folder, root)}") from err
    try:
        with _socket_timeout(DOWNLOAD_SOCKET_TIMEOUT_S):
            return family.dataset_class(root, train=train, download=True)
    except Exception as err:  # URLError, timeouts, HTTP errors, bad checksums, broken archives
        raise KdrunError(
            f"downloading {name} into {root} failed ({type(err).__name__}: {one_line(err)}): check the "
            f"network, or fetch the files elsewhere and put them at {folder}, then run with "
            f"dataset.download=false") from err


@contextlib.contextmanager
def _socket_timeout(seconds: float) -> Iterator[None]:
    # torchvision's urllib calls take no timeout; the process-wide default is the only lever.
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


def _as_tensors(source) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images (N, C, H, W) and int64 labels from a torchvision dataset's `.data`/`.targets`."""
    data = source.data
    images = torch.from_numpy(np.ascontiguousarray(data)) if isinstance(data, np.ndarray) else torch.as_tensor(data)
    if images.dim() == 3:  # MNIST-like: (N, H, W) grayscale
        images = images.unsqueeze(1)
    else:  # CIFAR: (N, H, W, C)
        images = images.permute(0, 3, 1, 2)
    return images.to(torch.uint8).contiguous(), torch.as_tensor(source.targets, dtype=torch.int64)

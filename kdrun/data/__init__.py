"""Datasets for kdrun: `build_dataset(cfg)` turns a dataset config into a DataBundle.

Families (one module each): embedded (mnist5k, digits: shipped in packages, offline),
torchvision_sets (cifar10, cifar100, mnist, fashion_mnist), imagefolder (any train/val folder) and
synthetic (tiny learnable random images for tests). Every item is (normalized float image C x H x W,
int label, int index); user mistakes surface as one-line KdrunErrors.
"""
from __future__ import annotations

import difflib
from functools import partial
from typing import Any, Callable, Mapping

from kdrun.data.bundle import DataBundle, InMemoryDataset, describe
from kdrun.data.embedded import build_digits, build_mnist5k
from kdrun.data.imagefolder import build_imagefolder
from kdrun.data.synthetic import build_synthetic
from kdrun.data.torchvision_sets import build_torchvision_dataset
from kdrun.errors import KdrunError

__all__ = ["DataBundle", "InMemoryDataset", "build_dataset", "dataset_names", "describe"]

# Each builder takes the dataset's config without `name`.
_BUILDERS: dict[str, Callable[[Mapping[str, Any]], DataBundle]] = {
    "mnist5k": build_mnist5k,
    "digits": build_digits,
    "cifar10": partial(build_torchvision_dataset, "cifar10"),
    "cifar100": partial(build_torchvision_dataset, "cifar100"),
    "mnist": partial(build_torchvision_dataset, "mnist"),
    "fashion_mnist": partial(build_torchvision_dataset, "fashion_mnist"),
    "imagefolder": build_imagefolder,
    "synthetic": build_synthetic,
}


def dataset_names() -> list[str]:
    return sorted(_BUILDERS)


def build_dataset(cfg: Mapping[str, Any]) -> DataBundle:
    """Build the dataset named by cfg['name'] from a plain dict or an OmegaConf DictConfig."""
    options = _plain_dict(cfg)
    name = options.pop("name", None)
    if name is None:
        raise KdrunError(f"the dataset config has no name: pass dataset=NAME, one of: {', '.join(dataset_names())}")
    builder = _BUILDERS.get(str(name))
    if builder is None:
        raise KdrunError(_unknown_name_message(str(name)))
    return builder(options)


def _plain_dict(cfg: Mapping[str, Any]) -> dict[str, Any]:
    from omegaconf import DictConfig, OmegaConf

    if isinstance(cfg, DictConfig):  # resolve interpolations and turn ListConfig values into lists
        return OmegaConf.to_container(cfg, resolve=True)
    return dict(cfg)


def _unknown_name_message(name: str) -> str:
    names = dataset_names()
    message = f"unknown dataset '{name}'; choose one of: {', '.join(names)}"
    close = difflib.get_close_matches(name.lower(), names, n=1)
    return message + (f"; did you mean '{close[0]}'?" if close else "")

"""Datasets for kdrun: `build_dataset(cfg)` turns a dataset config into a DataBundle.

Families (one module each): embedded (mnist5k, digits: shipped in packages, offline),
torchvision_sets (cifar10, cifar100, mnist, fashion_mnist), imagefolder (any train/val folder) and
synthetic (tiny learnable random images for tests). Each builder registers itself in
kdrun.data.registry.DATASETS where it is defined (any new module of this package is imported below), with
the schema of its config. Every item is (normalized float image C x H x W, int label, int index); user
mistakes surface as one-line KdrunErrors.
"""
from __future__ import annotations

import importlib
import pkgutil
from typing import Any, Mapping

from kdrun.config.groups import VALIDATION_KEYS
from kdrun.data.bundle import DataBundle, InMemoryDataset, describe, validation_set
from kdrun.data.registry import DATASETS
from kdrun.data.validation import hold_out_validation
from kdrun.errors import KdrunError

__all__ = ["DATASETS", "DataBundle", "InMemoryDataset", "build_dataset", "dataset_names", "describe",
           "validation_set"]


def dataset_names() -> list[str]:
    return DATASETS.names()


def build_dataset(cfg: Mapping[str, Any]) -> DataBundle:
    """Build the dataset named by cfg['name'] from a plain dict or an OmegaConf DictConfig."""
    options = _plain_dict(cfg)
    name = options.pop("name", None)
    if name is None:
        raise KdrunError(f"the dataset config has no name: pass dataset=NAME, one of: {', '.join(dataset_names())}")
    val_split, val_seed = (options.pop(key, None) for key in VALIDATION_KEYS)  # kdrun's, not the builder's
    bundle = DATASETS.get(str(name))(options)
    if val_split:
        bundle = hold_out_validation(bundle, float(val_split), int(val_seed or 0))
    return bundle


def _plain_dict(cfg: Mapping[str, Any]) -> dict[str, Any]:
    from omegaconf import DictConfig, OmegaConf

    if isinstance(cfg, DictConfig):  # resolve interpolations and turn ListConfig values into lists
        return OmegaConf.to_container(cfg, resolve=True)
    return dict(cfg)


def _load_builder_modules() -> None:
    """Import every module of this package, so that each builder registers itself (no list to extend)."""
    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")


_load_builder_modules()

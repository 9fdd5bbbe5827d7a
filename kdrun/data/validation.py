"""`dataset.val_split`: a seeded, stratified share of the training set held out for validation.

With it, the best epoch of every stage (and so the objective a sweeper such as Optuna sees) is chosen on
images the model never trained on and that are not the test split; the test split is only reported.
The held-out images are never augmented. Positions are renumbered, so per-sample data (cached teacher
outputs, CRD's memory bank) index the smaller training set.
"""
from __future__ import annotations

import dataclasses

import torch

from kdrun.data.bundle import DataBundle, InMemoryDataset
from kdrun.errors import KdrunError


def stratified_holdout(labels: torch.Tensor, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train positions, validation positions), both sorted: round(fraction * n_c) of each class c,
    drawn with a generator seeded by `seed`, at most n_c - 1 so that training keeps every class."""
    generator = torch.Generator().manual_seed(int(seed))
    held_out = []
    for label in torch.unique(labels).tolist():
        members = torch.nonzero(labels == label).flatten()
        count = min(int(round(fraction * len(members))), len(members) - 1)
        held_out.append(members[torch.randperm(len(members), generator=generator)[:count]])
    val = torch.sort(torch.cat(held_out)).values
    keep = torch.ones(len(labels), dtype=torch.bool)
    keep[val] = False
    return torch.nonzero(keep).flatten(), val


def hold_out_validation(bundle: DataBundle, fraction: float, seed: int) -> DataBundle:
    """The bundle with `val` split off its training set (dataset.val_split=fraction, dataset.val_split_seed=seed)."""
    train = bundle.train
    if not isinstance(train, InMemoryDataset):
        raise KdrunError(f"dataset.val_split is not supported for dataset {bundle.name} (its images are read from "
                         f"files): hold images out in a folder of their own and pass it as dataset.val_dir=NAME, "
                         f"or drop dataset.val_split")
    train_idx, val_idx = stratified_holdout(train.labels.cpu(), fraction, seed)
    if len(val_idx) == 0:
        raise KdrunError(f"dataset.val_split={fraction} holds out no image of the {len(train)} training images "
                         f"({bundle.num_classes} classes): pass a larger fraction, e.g. dataset.val_split=0.1")
    images, labels = train.images, train.labels
    train_idx, val_idx = train_idx.to(images.device), val_idx.to(images.device)
    return dataclasses.replace(
        bundle,
        train=InMemoryDataset(images[train_idx], labels[train_idx], train.mean, train.std, train.augment),
        val=InMemoryDataset(images[val_idx], labels[val_idx], train.mean, train.std))

"""Checks of values that can be judged from the config alone, before torch, timm or a dataset loads.

Each answers in well under a second what would otherwise take the seconds of those imports (or a
teacher's training) to surface.
"""
from __future__ import annotations

import re
from pathlib import Path

from omegaconf import DictConfig

from kdrun.errors import KdrunError
from kdrun.paths import group_options
from kdrun.registry import unknown_name

DEVICE = re.compile(r"(auto|cpu|mps|cuda(:\d+)?)")


def check_inputs(cfg: DictConfig) -> None:
    _check_device(str(cfg.device))
    _check_dataset_name(str(cfg.dataset.name))
    for role in ("teacher", "student"):
        _check_checkpoint_path(cfg[role].get("checkpoint"), f"{role}.checkpoint")


def _check_device(device: str) -> None:
    if not DEVICE.fullmatch(device):
        raise KdrunError(f"device={device} is not a device: use auto, cpu, cuda, cuda:N or mps")


def _check_dataset_name(name: str) -> None:
    # The files of conf/dataset/ before torch loads; tests/test_registries.py keeps them equal to the
    # registered builders (kdrun.data.registry.DATASETS), which build_dataset() reads after.
    names = group_options("dataset")
    if name not in names:
        raise KdrunError(unknown_name("dataset", name, names, "dataset=NAME"))


def _check_checkpoint_path(value, option: str) -> None:
    if not value:
        return
    path = Path(str(value)).expanduser()
    if not path.exists():
        raise KdrunError(f"{option}={path}: no such file; pass the path of a kdrun checkpoint "
                         "(e.g. outputs/runs/.../checkpoints/best.pt) or of a saved state dict")
    if path.is_dir():
        raise KdrunError(f"{option}={path} is a directory; pass a checkpoint file such as {path}/best.pt")

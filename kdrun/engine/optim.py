"""Optimizers and per-step learning-rate schedules from the optim/ and sched/ config groups."""
from __future__ import annotations

import math
from typing import Any, Iterable, Mapping

import torch

from kdrun.errors import KdrunError, one_line


def build_optimizer(params: Iterable[torch.nn.Parameter], cfg: Mapping[str, Any], lr: float) -> torch.optim.Optimizer:
    name = cfg.get("name", "sgd")
    params = [p for p in params if p.requires_grad]
    try:
        return _optimizer(name, params, cfg, lr)
    except ValueError as error:  # torch.optim's own checks, e.g. "Invalid momentum value: -1.0"
        settings = ", ".join(f"optim.{key}={value}" for key, value in cfg.items() if key != "name")
        raise KdrunError(f"optim={name} refuses its values (lr={lr}, {settings}): {one_line(error)}; "
                         "fix the value it names") from error


def _optimizer(name: str, params: list[torch.nn.Parameter], cfg: Mapping[str, Any], lr: float) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=cfg.get("momentum", 0.9),
                               nesterov=cfg.get("nesterov", False), weight_decay=cfg.get("weight_decay", 0.0))
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=tuple(cfg.get("betas", (0.9, 0.999))),
                                 weight_decay=cfg.get("weight_decay", 0.01))
    if name == "dot":
        from kdrun.engine.dot import DistillationOrientedSGD

        return DistillationOrientedSGD(params, lr=lr, momentum=cfg.get("momentum", 0.9), delta=cfg.get("delta", 0.075),
                                       weight_decay=cfg.get("weight_decay", 0.0))
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=cfg.get("weight_decay", 0.0))
    raise KdrunError(f"unknown optimizer '{name}': use optim=sgd, optim=adamw or optim=dot")


def lr_factor(cfg: Mapping[str, Any], step: int, steps_per_epoch: int, epochs: int) -> float:
    """The multiplier of the base learning rate at a global step (stepped once per batch)."""
    name = cfg.get("name", "constant")
    warmup_steps = int(cfg.get("warmup_epochs", 0) * steps_per_epoch)
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if name == "constant":
        return 1.0
    if name == "cosine":
        total = max(1, epochs * steps_per_epoch - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup_steps) / total)))
    if name == "multistep":
        epoch = step // steps_per_epoch
        passed = sum(1 for milestone in cfg.get("milestones", []) if epoch >= milestone)
        return float(cfg.get("gamma", 0.1)) ** passed
    raise KdrunError(f"unknown schedule '{name}': use sched=cosine, sched=multistep or sched=constant")


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: Mapping[str, Any], steps_per_epoch: int,
                    epochs: int) -> torch.optim.lr_scheduler.LambdaLR:
    lr_factor(cfg, 0, steps_per_epoch, epochs)  # fail early on an unknown name
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(cfg, step, steps_per_epoch, epochs))

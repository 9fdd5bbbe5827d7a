"""One training step and one epoch of them: forward, loss, backward, optimizer step.

`TrainStep` is the forward pass and the loss as one module: what DDP wraps in a torchrun launch. Its
submodules are exactly the trainable parts (the student, or its feature taps, and the loss with its
adapters), so DDP synchronises their gradients and nothing else. The teacher (live, cached outputs,
feature taps, strong view: kdrun.engine.forward.StepForward) is a plain attribute, so it is neither
broadcast nor synchronised.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from kdrun.distill import DistillLoss
from kdrun.engine import distributed
from kdrun.engine.divergence import LossWatch, Where
from kdrun.engine.dot import optimizer_step
from kdrun.engine.forward import StepForward
from kdrun.engine.loaders import Batches
from kdrun.engine.speed import Speed


class TrainStep(nn.Module):
    def __init__(self, step_forward: StepForward, loss: DistillLoss, speed: Speed):
        super().__init__()
        features = step_forward.features
        self.student = features.student if features is not None else step_forward.student
        self.loss = loss
        self.step_forward = step_forward   # not an nn.Module: not registered
        self.speed = speed

    def forward(self, images: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor,
                epoch: int) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
        outputs = self.step_forward(self.speed.inputs(images), labels, indices, epoch)
        total, parts = self.loss(outputs)
        return total, parts, outputs.student_logits


@dataclass
class Training:
    """What every epoch of a stage reuses: built once by kdrun.engine.trainer.prepare_training."""
    stage: Any                      # kdrun.engine.trainer.Stage
    student: nn.Module
    loss: DistillLoss
    train_set: Any
    step: nn.Module                 # TrainStep, DDP-wrapped under torchrun
    optimizer: torch.optim.Optimizer
    scheduler: Any
    steps_per_epoch: int

    def where(self, epoch: int) -> Where:
        stage = self.stage
        return Where(stage.name, epoch, stage.recipe.epochs, self.steps_per_epoch, stage.checkpoint_dir)


def train_epoch(training: Training, epoch: int) -> dict:
    """One pass over the training set; returns the epoch's mean losses, train top-1 and last lr."""
    stage, speed, optimizer = training.stage, training.stage.speed, training.optimizer
    training.student.train()
    training.loss.train()
    batches = Batches(training.train_set, stage.recipe.batch_size, stage.device, shuffle=True, seed=stage.recipe.seed,
                      epoch=epoch, num_workers=stage.num_workers, shard=distributed.shard())
    names = ["loss", *(f"loss_{name}" for name in training.loss.terms)]
    # Losses stay on the device and are read once per epoch; a non-finite one stops the stage (divergence.py).
    watch = LossWatch(training.where(epoch), names, stage.device)
    lrs, correct, seen = [], torch.zeros((), device=stage.device), 0
    for images, labels, indices in tqdm(batches, desc=f"{stage.name} {epoch + 1}/{stage.recipe.epochs}",
                                        leave=False, disable=not stage.progress, unit="batch"):
        with speed.autocast():
            total, parts, student_logits = training.step(images, labels, indices, epoch)  # forward + loss
        optimizer_step(speed, optimizer, total, training.loss, parts)                      # backward + step
        lrs.append(optimizer.param_groups[0]["lr"])
        training.scheduler.step()
        watch.add(torch.stack([total.detach(), *(v.detach() for v in parts.values())]), lrs[-1])
        correct += (student_logits.detach().argmax(1) == labels).sum()
        seen += labels.numel()
    # This process's losses checked (watch.values raises at a non-finite step), then averaged over processes.
    values, correct, seen = distributed.reduce_epoch(watch.values().to(stage.device), correct, seen)
    values = values.cpu()
    _log_steps(stage.writer, names, values, lrs, epoch * training.steps_per_epoch)
    means = values.mean(0).tolist()
    return {**{name: round(v, 6) for name, v in zip(names, means)}, "train_top1": correct.item() / max(seen, 1),
            "lr": lrs[-1]}


def _log_steps(writer, names: list[str], values: torch.Tensor, lrs: list[float], first_step: int) -> None:
    if writer is None:
        return
    for i, row in enumerate(values.tolist()):
        for name, value in zip(names, row):
            writer.add_scalar(f"train/{name}", value, first_step + i)
        writer.add_scalar("train/lr", lrs[i], first_step + i)

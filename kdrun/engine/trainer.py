"""The one training loop, used by every stage (teacher, baseline, distilled student)."""
from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from kdrun.distill import DistillLoss
from kdrun.engine import distributed
from kdrun.engine.checkpoint import FORMAT, save_atomic
from kdrun.engine.divergence import LossWatch, Where, check_finite_weights
from kdrun.engine.evaluate import predict
from kdrun.engine.forward import FeaturePairing, StepForward
from kdrun.engine.last_checkpoint import load_last, restore, save_last
from kdrun.engine.loaders import Batches, on_device
from kdrun.engine.optim import build_optimizer, build_scheduler
from kdrun.engine.precision import Speed
from kdrun.engine.step import TrainStep
from kdrun.errors import KdrunError

log = logging.getLogger("kdrun")


@dataclass
class Recipe:
    epochs: int
    lr: float
    batch_size: int
    optim: dict
    sched: dict
    seed: int


@dataclass
class StageResult:
    history: list[dict] = field(default_factory=list)  # one entry per epoch
    best_top1: float = float("-inf")
    best_epoch: int = -1

    @property
    def last_top1(self) -> float:
        return self.history[-1]["val_top1"] if self.history else float("nan")


@dataclass
class Stage:
    """Everything one training stage needs besides the model and its loss."""
    name: str                       # teacher, baseline or student: the progress and log label
    recipe: Recipe
    device: torch.device
    checkpoint_dir: Path            # last.pt and best.pt go here
    meta: dict                      # saved in every checkpoint: model_name, num_classes, in_chans, ...
    writer: Any = None              # a SummaryWriter, or None
    progress: bool = False
    reference: dict = field(default_factory=dict)   # e.g. {"teacher": 0.98}: drawn beside val accuracy
    num_workers: int = 0
    speed: Speed = field(default_factory=Speed)     # precision, channels_last, compile


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def train(stage: Stage, model: nn.Module, loss: DistillLoss, train_set, val_set,
          teacher: Optional[nn.Module] = None, resume: bool = True,
          on_epoch: Optional[Callable[[int, dict], None]] = None,
          features: Optional[FeaturePairing] = None, teacher_outputs=None,
          strong_view: Optional[Callable] = None) -> StageResult:
    """Train `model` with `loss`; save last.pt every epoch and best.pt at the best validation top-1.

    With `resume`, a last.pt already in the checkpoint dir is continued instead of starting over.
    With `teacher_outputs` (kdrun.engine.teacher_cache), the teacher's outputs are read, not computed.
    With `strong_view` (kdrun.data.strong_view), both models also see a strong view of every batch (MLKD).
    In a torchrun launch every process trains its shard of each batch; rank 0 alone saves.
    """
    recipe, device = stage.recipe, stage.device
    if recipe.batch_size > len(train_set):
        raise KdrunError(f"batch_size={recipe.batch_size} is larger than the training set "
                         f"({len(train_set)} images); pass batch_size={min(len(train_set), 128)} or smaller")
    if loss.needs_teacher and teacher is None:
        raise KdrunError("the distillation loss needs a teacher but none was built")
    model.to(device)
    loss.to(device)
    train_set, val_set = on_device(train_set, device), on_device(val_set, device)
    stage.speed.prepare(features.student if features is not None else model)
    steps_per_epoch = len(Batches(train_set, recipe.batch_size, device, shuffle=True, shard=distributed.shard()))
    optimizer = build_optimizer(list(model.parameters()) + list(loss.parameters()), recipe.optim, recipe.lr)
    scheduler = build_scheduler(optimizer, recipe.sched, steps_per_epoch, recipe.epochs)
    result, start_epoch = StageResult(), 0

    resumed = load_last(stage.checkpoint_dir, stage.name, stage.meta) if resume else None
    if resumed is not None:
        state, last_path = resumed
        restore(state, last_path, stage.name, (model, "model"), (loss, "loss"), (optimizer, "optimizer"),
                (scheduler, "scheduler"))
        _set_rng_state(state["rng"])
        stage.speed.load_state_dict(state.get("scaler"))
        result = StageResult(state["history"], state["best_top1"], state["best_epoch"])
        start_epoch = state["epoch"]
        log.info("%s: resuming from %s (epoch %d/%d done)", stage.name, last_path, start_epoch, recipe.epochs)

    if teacher is not None:
        teacher.to(device).eval().requires_grad_(False)
        if teacher_outputs is None:
            stage.speed.prepare(features.teacher if features is not None else teacher)
    step_forward = StepForward(model, teacher if loss.needs_teacher else None, features, teacher_outputs,
                               strong_view)
    train_step = distributed.wrap(TrainStep(step_forward, loss, stage.speed), device)
    epochs_bar = tqdm(range(start_epoch, recipe.epochs), desc=stage.name, unit="epoch",
                      disable=not stage.progress, initial=start_epoch, total=recipe.epochs)
    for epoch in epochs_bar:
        started = time.perf_counter()
        train_stats = _train_one_epoch(stage, model, loss, train_set, train_step, optimizer, scheduler,
                                       epoch, steps_per_epoch)
        distributed.sync_buffers(model)  # every process evaluates (and rank 0 saves) rank 0's BatchNorm statistics
        val_logits, val_labels = predict(model, val_set, recipe.batch_size, device)
        val_top1 = (val_logits.argmax(1) == val_labels).float().mean().item()
        record = {"epoch": epoch + 1, **train_stats, "val_top1": val_top1,
                  "seconds": round(time.perf_counter() - started, 3)}
        result.history.append(record)
        improved = val_top1 > result.best_top1
        if improved:
            result.best_top1, result.best_epoch = val_top1, epoch + 1
        _log_epoch(stage, record, recipe.epochs)
        checkpoint = {
            "format": FORMAT, "version": 1, **stage.meta, "stage": stage.name,
            "model": model.state_dict(), "loss": loss.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "epoch": epoch + 1, "history": result.history,
            "best_top1": result.best_top1, "best_epoch": result.best_epoch, "rng": _rng_state(),
            "scaler": stage.speed.state_dict(),
        }
        # A non-finite gradient can spoil the weights while the losses stay finite: never save that.
        check_finite_weights(_where(stage, epoch, steps_per_epoch), [model, loss], record["lr"])
        if distributed.is_main():  # in a torchrun launch the others hold the same weights
            if improved:
                save_atomic({**checkpoint, "optimizer": None, "scheduler": None}, stage.checkpoint_dir / "best.pt")
            save_last(checkpoint, stage.checkpoint_dir)
        if on_epoch is not None:
            on_epoch(epoch, record)
    epochs_bar.close()
    return result


def _train_one_epoch(stage: Stage, model, loss, train_set, train_step: TrainStep, optimizer, scheduler,
                     epoch: int, steps_per_epoch: int) -> dict:
    model.train()
    loss.train()
    batches = Batches(train_set, stage.recipe.batch_size, stage.device, shuffle=True,
                      seed=stage.recipe.seed, epoch=epoch, num_workers=stage.num_workers, shard=distributed.shard())
    names = ["loss", *(f"loss_{name}" for name in loss.terms)]
    # Kept on the device and read once per epoch; a non-finite value stops the stage at once (see divergence.py).
    watch = LossWatch(_where(stage, epoch, steps_per_epoch), names, stage.device)
    lrs: list[float] = []
    correct = torch.zeros((), device=stage.device)
    seen = 0
    bar = tqdm(batches, desc=f"{stage.name} {epoch + 1}/{stage.recipe.epochs}", leave=False,
               disable=not stage.progress, unit="batch")
    for images, labels, indices in bar:
        with stage.speed.autocast():
            total, parts, student_logits = train_step(images, labels, indices, epoch)
        stage.speed.backward_and_step(total, optimizer)
        lrs.append(optimizer.param_groups[0]["lr"])
        scheduler.step()
        watch.add(torch.stack([total.detach(), *(v.detach() for v in parts.values())]), lrs[-1])
        correct += (student_logits.detach().argmax(1) == labels).sum()
        seen += labels.numel()
    # This process's losses checked (watch.values raises at a non-finite step), then averaged over processes.
    values, correct, seen = distributed.reduce_epoch(watch.values().to(stage.device), correct, seen)
    values = values.cpu()
    if stage.writer is not None:
        first_step = epoch * steps_per_epoch
        for i, row in enumerate(values.tolist()):
            for name, value in zip(names, row):
                stage.writer.add_scalar(f"train/{name}", value, first_step + i)
            stage.writer.add_scalar("train/lr", lrs[i], first_step + i)
    means = values.mean(0).tolist()
    return {**{name: round(v, 6) for name, v in zip(names, means)}, "train_top1": correct.item() / max(seen, 1),
            "lr": lrs[-1]}


def _where(stage: Stage, epoch: int, steps_per_epoch: int) -> Where:
    return Where(stage.name, epoch, stage.recipe.epochs, steps_per_epoch, stage.checkpoint_dir)


def _log_epoch(stage: Stage, record: dict, epochs: int) -> None:
    log.info("%s epoch %d/%d: loss %.4f, train top-1 %.2f%%, val top-1 %.2f%% (%.1fs)", stage.name,
             record["epoch"], epochs, record["loss"], 100 * record["train_top1"], 100 * record["val_top1"],
             record["seconds"])
    if stage.writer is not None:
        step = record["epoch"]
        stage.writer.add_scalar("epoch/train_top1", record["train_top1"], step)
        stage.writer.add_scalar("epoch/val_top1", record["val_top1"], step)
        for name, value in stage.reference.items():
            stage.writer.add_scalar(f"epoch/{name}_val_top1", value, step)
        stage.writer.flush()

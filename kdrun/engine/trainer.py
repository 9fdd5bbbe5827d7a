"""The one training loop, used by every stage (teacher, baseline, student, peers, generations, assistant):
epochs of kdrun.engine.step.train_epoch, evaluation, checkpoints and resume."""
from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from tqdm.auto import tqdm

from kdrun.distill import DistillLoss
from kdrun.engine import distributed
from kdrun.engine.checkpoint import model_checkpoint, save_atomic
from kdrun.engine.divergence import check_finite_weights
from kdrun.engine.evaluate import predict
from kdrun.engine.forward import StepForward
from kdrun.engine.init_phase import run_init_phase
from kdrun.engine.last_checkpoint import load_last, restore, save_last
from kdrun.engine.loaders import Batches, check_batch_fits, on_device
from kdrun.engine.optim import build_optimizer, build_scheduler
from kdrun.engine.speed import Speed
from kdrun.engine.step import Training, TrainStep, train_epoch
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

    @property
    def best_test_top1(self) -> Optional[float]:
        """The test top-1 of the best epoch, when validation used a held-out split (dataset.val_split)."""
        if not 1 <= self.best_epoch <= len(self.history):
            return None
        return self.history[self.best_epoch - 1].get("test_top1")


@dataclass
class Stage:
    """Everything one training stage needs besides what runs in a step (models and loss)."""
    name: str                       # teacher, baseline, student, peers, gen1, ...: the progress and log label
    recipe: Recipe
    device: torch.device
    checkpoint_dir: Path            # last.pt and best.pt go here
    meta: dict                      # saved in every checkpoint: model_name, num_classes, in_chans, ...
    writer: Any = None              # a SummaryWriter, or None
    progress: bool = False
    reference: dict = field(default_factory=dict)   # e.g. {"teacher": 0.98}: drawn beside val accuracy
    num_workers: int = 0
    speed: Speed = field(default_factory=Speed)     # precision, channels_last, compile
    resume: bool = True             # continue a last.pt already in checkpoint_dir instead of starting over
    on_epoch: Optional[Callable[[int, dict], None]] = None   # called after each epoch with its record
    # called after each epoch's validation with (epoch number, validation logits, labels): per-epoch
    # metrics beyond top-1 (agreement, ECE, ...) from the logits the epoch already computed
    on_validation: Optional[Callable[[int, torch.Tensor, torch.Tensor], None]] = None


def _rng_state() -> dict:
    """Every generator a stage draws from, as tensors and plain numbers: last.pt stays loadable with
    torch.load(weights_only=True), like every checkpoint kdrun writes."""
    _, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(position),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    numpy_state = state["numpy"]
    if isinstance(numpy_state, dict):
        numpy_state = ("MT19937", numpy_state["keys"].numpy().astype(np.uint32), numpy_state["pos"],
                       numpy_state["has_gauss"], numpy_state["cached_gaussian"])
    np.random.set_state(numpy_state)  # a tuple as numpy gives it: a checkpoint of an earlier kdrun
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def prepare_training(stage: Stage, forward: StepForward, loss: DistillLoss, train_set, wrap: bool = True) -> Training:
    """Models and loss on the device, the optimizer and schedule, and the step (DDP-wrapped under torchrun,
    unless `wrap` is false: the caller wraps it later)."""
    recipe, device = stage.recipe, stage.device
    check_batch_fits(recipe.batch_size, train_set)
    if loss.needs_teacher and not forward.has_teacher:
        raise KdrunError("the distillation loss needs a teacher but none was built")
    student = forward.student.to(device)
    loss.to(device)
    train_set = on_device(train_set, device)
    stage.speed.prepare(forward.features.student if forward.features is not None else student)
    forward.prepare_teacher(device, stage.speed)
    steps_per_epoch = len(Batches(train_set, recipe.batch_size, device, shuffle=True, shard=distributed.shard()))
    optimizer = build_optimizer(list(student.parameters()) + list(loss.parameters()), recipe.optim, recipe.lr)
    scheduler = build_scheduler(optimizer, recipe.sched, steps_per_epoch, recipe.epochs)
    step = TrainStep(forward, loss, stage.speed)
    step = distributed.wrap(step, device) if wrap else step
    return Training(stage, student, loss, train_set, step, optimizer, scheduler, steps_per_epoch)


def train(stage: Stage, forward: StepForward, loss: DistillLoss, train_set, val_set, test_set=None) -> StageResult:
    """Train `forward.student` with `loss`; save last.pt every epoch and best.pt at the best validation top-1.

    `val_set` picks the best epoch. `test_set`, given when validation is a held-out part of the training
    set (dataset.val_split), is evaluated every epoch too and recorded as `test_top1`, never used to choose.

    `forward` holds what a step runs: the student, and the teacher as a model, its cached outputs
    (kdrun.engine.teacher_cache), feature taps or a strong view (kdrun.engine.forward.StepForward).
    In a torchrun launch every process trains its shard of each batch; rank 0 alone saves.
    """
    training = prepare_training(stage, forward, loss, train_set, wrap=False)
    model, recipe, device = training.student, stage.recipe, stage.device
    val_set = on_device(val_set, device)
    test_set = on_device(test_set, device) if test_set is not None else None
    result, start_epoch = _resume(stage, training) if stage.resume else (StageResult(), 0)
    if start_epoch == 0:
        run_init_phase(training)  # two-stage methods (AB, FSP, FT) first initialize (kdrun.engine.init_phase)
    # DDP after the init phase: DDP hooks every parameter, and the phase's own steps must not reach them.
    training.step = distributed.wrap(training.step, device)
    epochs_bar = tqdm(range(start_epoch, recipe.epochs), desc=stage.name, unit="epoch",
                      disable=not stage.progress, initial=start_epoch, total=recipe.epochs)
    for epoch in epochs_bar:
        started = time.perf_counter()
        train_stats = train_epoch(training, epoch)
        distributed.sync_buffers(model)  # every process evaluates (and rank 0 saves) rank 0's BatchNorm statistics
        val_logits, val_labels = predict(model, val_set, recipe.batch_size, device)
        val_top1 = (val_logits.argmax(1) == val_labels).float().mean().item()
        record = {"epoch": epoch + 1, **train_stats, "val_top1": val_top1}
        if test_set is not None:
            test_logits, test_labels = predict(model, test_set, recipe.batch_size, device)
            record["test_top1"] = (test_logits.argmax(1) == test_labels).float().mean().item()
        record["seconds"] = round(time.perf_counter() - started, 3)
        result.history.append(record)
        improved = val_top1 > result.best_top1
        if improved:
            result.best_top1, result.best_epoch = val_top1, epoch + 1
        _log_epoch(stage, record, recipe.epochs)
        if stage.on_validation is not None:
            stage.on_validation(epoch + 1, val_logits, val_labels)
        # A non-finite gradient can spoil the weights while the losses stay finite: never save that.
        check_finite_weights(training.where(epoch), [model, loss], record["lr"])
        if distributed.is_main():  # in a torchrun launch the others hold the same weights
            _save(stage, training, result, epoch, improved)
        if stage.on_epoch is not None:
            stage.on_epoch(epoch, record)
    epochs_bar.close()
    return result


def _resume(stage: Stage, training: Training) -> tuple[StageResult, int]:
    """The history and next epoch of a last.pt in the checkpoint dir, with every state restored."""
    resumed = load_last(stage.checkpoint_dir, stage.name, stage.meta)
    if resumed is None:
        return StageResult(), 0
    state, last_path = resumed
    restore(state, last_path, stage.name, (training.student, "model"), (training.loss, "loss"),
            (training.optimizer, "optimizer"), (training.scheduler, "scheduler"))
    _set_rng_state(state["rng"])
    stage.speed.load_state_dict(state.get("scaler"))
    log.info("%s: resuming from %s (epoch %d/%d done)", stage.name, last_path, state["epoch"], stage.recipe.epochs)
    return StageResult(state["history"], state["best_top1"], state["best_epoch"]), state["epoch"]


def _save(stage: Stage, training: Training, result: StageResult, epoch: int, improved: bool) -> None:
    """last.pt with everything a resume needs; best.pt (weights and history) when the epoch improved."""
    kept = {"loss": training.loss.state_dict(), "epoch": epoch + 1, "history": result.history,
            "best_top1": result.best_top1, "best_epoch": result.best_epoch}
    if improved:
        save_atomic(model_checkpoint(training.student, stage.meta, stage.name, **kept, optimizer=None,
                                     scheduler=None), stage.checkpoint_dir / "best.pt")
    save_last(model_checkpoint(training.student, stage.meta, stage.name, **kept,
                               optimizer=training.optimizer.state_dict(), scheduler=training.scheduler.state_dict(),
                               rng=_rng_state(), scaler=stage.speed.state_dict()), stage.checkpoint_dir)


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

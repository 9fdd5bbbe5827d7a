"""The run's preflight: before any stage trains, every model of the run takes one training step.

A student that cannot take the dataset's image size, a BatchNorm model on batches of one image, a loss term
that does not fit its models, an optimizer value torch refuses, a dataset of one class: each would otherwise
fail after the teacher trained for minutes. Here, for every stage the paradigm will run (the steps it registers), its models
are built as the stage builds them (checkpoints loaded), and take one step on a real batch of the training
set: forward in train mode (the run's precision and memory layout, not compiled), loss, backward, the
optimizer and schedule with the stage's real values, then a forward in eval mode. A batch of
min(2, the smallest batch training will see) images: two are enough for every shape, one only when training
will see one (batch_size=1, or one per process under torchrun), where BatchNorm fails.

Nothing of the run changes: these models are built for the check and dropped after it (the stages build
their own, so no BatchNorm statistic moves), the random generators are restored (metrics.json is the same
with or without the preflight), nothing is written (no cache entry, no file in the run directory).
Every failure is one line naming the model or the value and exit 2 (kdrun.cli).
"""
from __future__ import annotations

import contextlib
import gc
import logging
import random
import time
from typing import Iterator

import numpy as np
import torch
from torch import nn
from torch.utils.data import default_collate

from kdrun.data import DataBundle, InMemoryDataset
from kdrun.engine import distributed
from kdrun.engine.dot import optimizer_step
from kdrun.engine.loaders import Batches, check_batch_fits
from kdrun.engine.optim import build_optimizer, build_scheduler
from kdrun.engine.speed import Speed
from kdrun.errors import KdrunError, one_line
from kdrun.paradigms import PARADIGMS
from kdrun.stages.context import RunContext
from kdrun.stages.steps import Step, student_only

log = logging.getLogger("kdrun")

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def preflight(ctx: RunContext, paradigm: str) -> float:
    """Check the run as described above; returns the seconds it took."""
    started = time.perf_counter()
    check_classes(ctx.data)
    check_batch_fits(ctx.cfg.batch_size, ctx.data.train)
    smallest = smallest_batch(ctx)
    speed = Speed(ctx.speed.precision, ctx.speed.channels_last, False, ctx.speed.device_type)  # its own GradScaler
    with kept_random_state(ctx.device):
        batch = first_batch(ctx.data, min(2, smallest), ctx.device)
        steps = take_steps(ctx, PARADIGMS.info(paradigm).get("preflight", student_only)(ctx), batch, speed)
    if ctx.device.type == "cuda":  # the preflight's models are gone: the stages get their memory
        gc.collect()
        torch.cuda.empty_cache()
    seconds = time.perf_counter() - started
    log.info("preflight: %d stage(s) took a training step on %d %s image(s) (%.2f s)", steps, len(batch[0]),
             "x".join(map(str, batch[0].shape[1:])), seconds)
    return seconds


# --- the step --------------------------------------------------------------------------------------------------

def take_steps(ctx: RunContext, steps: Iterator[Step], batch: Batch, speed: Speed) -> int:
    """Each step in turn; the models die with this call. Returns how many steps were taken."""
    steps_per_epoch = len(Batches(ctx.data.train, ctx.cfg.batch_size, ctx.device, shuffle=True,
                                  shard=distributed.shard()))
    taken = 0
    for step in steps:
        take_step(ctx, step, batch, speed, steps_per_epoch)
        taken += 1
    return taken


def take_step(ctx: RunContext, step: Step, batch: Batch, speed: Speed, steps_per_epoch: int) -> None:
    images, labels, indices = batch
    phase = "build"
    try:
        forward, loss = step.parts()
        trainable = forward.features.student if forward.features is not None else forward.student
        trainable.to(ctx.device)
        loss.to(ctx.device)
        speed.prepare(trainable)
        forward.prepare_teacher(ctx.device, speed)
        if step.recipe is None:
            phase = "eval"
            frozen_forward(trainable, speed, images)
            return
        optimizer = build_optimizer(list(forward.student.parameters()) + list(loss.parameters()), step.recipe.optim,
                                    step.recipe.lr)
        scheduler = build_scheduler(optimizer, step.recipe.sched, steps_per_epoch, step.recipe.epochs)
        trainable.train()
        loss.train()
        phase = "train"
        with speed.autocast():
            outputs = forward(speed.inputs(images), labels, indices, 0)
            phase = "loss"
            total, parts = loss(outputs)
        check_finite_loss(step, total, parts)
        phase = "train"
        optimizer_step(speed, optimizer, total, loss, parts)
        scheduler.step()
        phase = "eval"
        frozen_forward(trainable, speed, images)  # as evaluation runs it: eval mode, no gradients
    except KdrunError:
        raise  # already one line naming what to fix (a layer name, a checkpoint, a loss option)
    except Exception as error:
        raise KdrunError(failure_line(ctx, step, phase, error, images)) from error


def frozen_forward(model: nn.Module, speed: Speed, images: torch.Tensor) -> None:
    model.eval()
    with torch.no_grad(), speed.autocast():
        model(speed.inputs(images))


def check_finite_loss(step: Step, total: torch.Tensor, parts: dict[str, torch.Tensor]) -> None:
    if torch.isfinite(total.detach()).all():
        return
    bad = ", ".join(f"loss_{name}={value.item():.4g}" for name, value in parts.items()
                    if not torch.isfinite(value.detach()).all())
    raise KdrunError(f"the loss of {step.label} is not finite on its first batch, before any training "
                     f"({bad or f'loss={total.item():.4g}'}): check T, alpha and the distill.terms options")


def failure_line(ctx: RunContext, step: Step, phase: str, error: BaseException, images: torch.Tensor) -> str:
    reason = one_line(error, limit=300)
    count, shape = len(images), "x".join(map(str, images.shape[1:]))
    where = f"a batch of {count} {shape} image{'s' if count > 1 else ''}"
    if isinstance(error, torch.cuda.OutOfMemoryError):
        return f"{step.label} runs out of GPU memory on {where}: pass a smaller batch_size or model"
    if phase == "build":
        method = " and the distill.terms options" if step.method else ""
        return f"{step.label} cannot be built: {reason}; check {step.role}.name, {step.role}.kwargs{method}"
    if phase == "loss":
        return (f"the loss of {step.label} (distill={ctx.cfg.distill.get('name')}) fails on its first batch: "
                f"{reason}; check the distill.terms options")
    batch_size, processes = ctx.cfg.batch_size, distributed.shard()[1]
    if "more than 1 value per channel" in reason:  # BatchNorm in train mode, one value per channel
        split = f" split over {processes} processes" if processes > 1 else ""
        return (f"{step.label} cannot train on batches of 1 image (batch_size={batch_size}{split}): its "
                f"BatchNorm needs 2 or more: pass batch_size={2 * processes} or larger ({reason})")
    size_key = "dataset.image_size" if "image_size" in ctx.cfg.dataset else None
    fix = f"a larger {size_key} (now {ctx.cfg.dataset.image_size}) or " if size_key else ""
    what = "a training step" if phase == "train" else "in eval mode"
    return f"{step.label} fails {what} on {where}: {reason}; pass {fix}another {step.role} model"


# --- data, batch sizes, random state -----------------------------------------------------------------------------

def check_classes(data: DataBundle) -> None:
    if data.num_classes < 2:
        found = f" ({', '.join(data.class_names)})" if data.class_names else ""
        fix = ("add a folder per class under the train and val folders" if data.name == "imagefolder"
               else "pick a dataset with 2 classes or more")
        raise KdrunError(f"dataset {data.name} has {data.num_classes} class{found}: a classifier needs 2 or more; {fix}")


def smallest_batch(ctx: RunContext) -> int:
    """The fewest images this process trains on in one step: a last partial batch, or its share under torchrun."""
    batches = Batches(ctx.data.train, ctx.cfg.batch_size, ctx.device, shuffle=True, seed=ctx.cfg.seed,
                      shard=distributed.shard()).batch_indices()
    return max(1, min((len(b) for b in batches), default=1))


def first_batch(data: DataBundle, count: int, device: torch.device) -> Batch:
    """The first `count` training images, labels and positions, as a training step gets them."""
    positions = torch.arange(min(count, len(data.train)))
    if isinstance(data.train, InMemoryDataset):
        images, labels, indices = data.train.batch(positions)
    else:
        images, labels, indices = default_collate([data.train[int(i)] for i in positions])
    return images.to(device), torch.as_tensor(labels).to(device), torch.as_tensor(indices).to(device)


@contextlib.contextmanager
def kept_random_state(device: torch.device):
    """Building models reseeds torch; augmentations and some loss terms draw from it: put every generator back."""
    python, numpy_state = random.getstate(), np.random.get_state()
    devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        random.setstate(python)
        np.random.set_state(numpy_state)


"""The run's preflight: before any stage trains, every model of the run takes one training step.

A student that cannot take the dataset's image size, a BatchNorm model on batches of one image, a loss term
that does not fit its models, an optimizer value torch refuses, a dataset of one class: each would otherwise
fail after the teacher trained for minutes. Here, for every stage the paradigm will run (STEPS), its models
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
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

import numpy as np
import torch
from torch import nn
from torch.utils.data import default_collate

from kdrun.data import DataBundle, InMemoryDataset
from kdrun.distill import DistillLoss, hard_label_loss
from kdrun.distill.multi_teacher import multi_teacher_loss
from kdrun.distill.mutual import mutual_learning_loss
from kdrun.engine import distributed
from kdrun.engine.checkpoint import load_model_weights
from kdrun.engine.forward import StepForward
from kdrun.engine.group import ModelGroup
from kdrun.engine.loaders import Batches, check_batch_fits
from kdrun.engine.optim import build_optimizer, build_scheduler
from kdrun.engine.speed import Speed
from kdrun.engine.trainer import Recipe
from kdrun.errors import KdrunError, one_line
from kdrun.paradigms.born_again import generation_context
from kdrun.paradigms.multi_teacher import teacher_configs
from kdrun.paradigms.online import build_peers, peer_configs
from kdrun.stages.context import RunContext, derive, plain
from kdrun.stages.roles import distill_forward, hard_label_role

log = logging.getLogger("kdrun")

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


@dataclass
class Step:
    """One stage's training step, built when the preflight reaches it."""
    label: str                      # names the model in messages: "student cifar:vgg8 (baseline)"
    role: str                       # the config key that chose the model, for hints: student, teacher, paradigm.peers
    build: Callable[[], tuple[StepForward, DistillLoss]]
    recipe: Optional[Recipe]        # None: the model only runs frozen (a teacher loaded from its checkpoint)
    method: bool = False            # trains with the run's distill method (its terms' options may be at fault)
    built: Optional[tuple[StepForward, DistillLoss]] = field(default=None, repr=False)

    def parts(self) -> tuple[StepForward, DistillLoss]:
        if self.built is None:
            self.built = self.build()
        return self.built

    def model(self) -> nn.Module:
        """The model this step trained, as a later step's teacher (built once: a teacher is often the largest)."""
        return self.parts()[0].student


def preflight(ctx: RunContext, paradigm: str) -> float:
    """Check the run as described above; returns the seconds it took."""
    started = time.perf_counter()
    check_classes(ctx.data)
    check_batch_fits(ctx.cfg.batch_size, ctx.data.train)
    smallest = smallest_batch(ctx)
    speed = Speed(ctx.speed.precision, ctx.speed.channels_last, False, ctx.speed.device_type)  # its own GradScaler
    with kept_random_state(ctx.device):
        batch = first_batch(ctx.data, min(2, smallest), ctx.device)
        steps = take_steps(ctx, STEPS.get(paradigm, student_only)(ctx), batch, speed)
    if ctx.device.type == "cuda":  # the preflight's models are gone: the stages get their memory
        gc.collect()
        torch.cuda.empty_cache()
    seconds = time.perf_counter() - started
    log.info("preflight: %d stage(s) took a training step on %d %s image(s) (%.2f s)", steps, len(batch[0]),
             "x".join(map(str, batch[0].shape[1:])), seconds)
    return seconds


# --- what each paradigm trains -------------------------------------------------------------------------------

def teacher_model(ctx: RunContext) -> nn.Module:
    """The teacher as its stage gets it: built, and loaded from its checkpoint when it has one."""
    model = ctx.build_model("teacher")
    if ctx.cfg.teacher.checkpoint:
        load_model_weights(model, ctx.cfg.teacher.checkpoint, "teacher.checkpoint", ctx.cfg.teacher.name,
                           ctx.data.num_classes)
    return model


def teacher_step(ctx: RunContext) -> Step:
    """Trained on hard labels, or (from a checkpoint) run frozen."""
    label = f"teacher {ctx.cfg.teacher.name}"
    if ctx.cfg.teacher.checkpoint:
        return Step(label, "teacher", lambda: (StepForward(teacher_model(ctx)), hard_label_loss()), None)
    return hard_label_step(ctx, "teacher", "teacher", label)


def hard_label_step(ctx: RunContext, stage: str, role: str, label: str) -> Step:
    def build():
        built = hard_label_role(ctx, stage, role)
        return built.forward, built.loss
    return Step(label, role, build, ctx.recipe(role))


def baseline_step(ctx: RunContext) -> Step:
    return hard_label_step(ctx, "baseline", "student", f"student {ctx.cfg.student.name} (baseline)")


def distill_step(ctx: RunContext, label: str, teacher: Callable[[], nn.Module], role: str = "student") -> Step:
    """ctx's student learning from `teacher()` with the run's method (feature taps, adapters, strong views)."""
    def build():
        model = ctx.build_model("student").to(ctx.device)
        frozen = teacher().to(ctx.device).eval().requires_grad_(False)
        return distill_forward(ctx, model, frozen, cached_teacher=False)  # never writes the teacher cache
    return Step(label, role, build, ctx.recipe("student"), method=True)


def offline_steps(ctx: RunContext) -> Iterator[Step]:
    teacher = teacher_step(ctx)
    yield teacher
    if ctx.cfg.baseline:
        yield baseline_step(ctx)
    yield distill_step(ctx, f"student {ctx.cfg.student.name}", teacher.model)


def online_steps(ctx: RunContext) -> Iterator[Step]:
    configs = peer_configs(ctx)
    settings = ctx.cfg.paradigm

    def build():
        loss = mutual_learning_loss(len(configs), float(settings.get("T", 1.0)), float(settings.get("kl_weight", 1.0)))
        return StepForward(build_peers(ctx, configs)), loss
    yield Step(f"peers {', '.join(c['name'] for c in configs)}", "paradigm.peers", build, ctx.recipe("student"))
    if ctx.cfg.baseline:
        for config in {repr(sorted(c.items())): c for c in configs}.values():
            yield baseline_step(derive(ctx, student=config))


def multi_teacher_steps(ctx: RunContext) -> Iterator[Step]:
    configs = teacher_configs(ctx)
    teachers = [teacher_step(derive(ctx, teacher=config)) for config in configs]
    yield from teachers
    if ctx.cfg.baseline:
        yield baseline_step(ctx)
    settings = ctx.cfg.paradigm
    weights = list(settings.weights) if settings.get("weights") is not None else None

    def build():
        group = ModelGroup([teacher.model() for teacher in teachers])
        group.to(ctx.device).eval().requires_grad_(False)
        loss = multi_teacher_loss(ctx.cfg.alpha, ctx.cfg.T, settings.get("weighting", "mean"), weights)
        return StepForward(ctx.build_model("student"), group), loss
    yield Step(f"student {ctx.cfg.student.name}", "student", build, ctx.recipe("student"))


def assistant_steps(ctx: RunContext) -> Iterator[Step]:
    assistant = plain(ctx.cfg.assistant)
    teacher = teacher_step(ctx)
    yield teacher
    if ctx.cfg.baseline:
        yield baseline_step(ctx)
    middle = distill_step(derive(ctx, student=assistant), f"assistant {assistant['name']}", teacher.model, "assistant")
    yield middle
    yield distill_step(derive(ctx, teacher=assistant), f"student {ctx.cfg.student.name} (from the assistant)",
                       middle.model)


def self_steps(ctx: RunContext) -> Iterator[Step]:
    """Every generation has the teacher's architecture: generation 1 stands for all of them."""
    teacher = teacher_step(ctx)
    yield teacher
    generations = int(ctx.cfg.paradigm.get("generations", 2))
    yield distill_step(generation_context(ctx, 1, generations), f"generation 1 {ctx.cfg.teacher.name}",
                       teacher.model, "teacher")


def student_only(ctx: RunContext) -> Iterator[Step]:
    """A paradigm this table does not know (registered elsewhere): at least its student."""
    yield baseline_step(ctx)


# paradigm name -> the steps of its stages (tests/test_preflight.py checks that every registered paradigm has one)
STEPS: dict[str, Callable[[RunContext], Iterator[Step]]] = {
    "offline": offline_steps,
    "teacher": lambda ctx: iter([teacher_step(ctx)]),
    "baseline": lambda ctx: iter([baseline_step(ctx)]),
    "online": online_steps,
    "multi_teacher": multi_teacher_steps,
    "assistant": assistant_steps,
    "self": self_steps,
}


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
        speed.backward_and_step(total, optimizer)
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


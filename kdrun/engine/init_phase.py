"""The initialization phase of two-stage feature methods (AB, FSP, FT), run before a stage's first epoch.

As the AB, FSP and FT papers and RepDistiller (Tian et al., ICLR 2020, its helper/pretrain.py) do, such a method
first trains, with its own loss alone (unweighted) for `init_epochs` epochs at a constant learning rate and with
an optimizer of its own, only what it initializes: AB its connectors and the student's layers, FSP the student's
layers, FT the paraphraser (an autoencoder of the teacher's map; the student is not reached and stays in eval
mode, so its BatchNorm statistics do not move). The stage's usual epochs then start with their own optimizer
and schedule, untouched. The optimizer is the run's kind (optim group) over every trainable parameter: one that
no init loss reaches gets no gradient and is skipped, weight decay included, so only the initialized parts move.
A resumed stage (a last.pt after its first epoch) does not repeat the phase: its result is in the checkpoint.
A stage of fewer epochs than `init_epochs` initializes for as many epochs as it has (a quick run stays quick).
"""
from __future__ import annotations

import logging

import torch

from kdrun.engine import distributed
from kdrun.engine.loaders import Batches
from kdrun.engine.optim import build_optimizer
from kdrun.engine.step import Training
from kdrun.errors import KdrunError

log = logging.getLogger("kdrun")


def run_init_phase(training: Training) -> list[dict[str, float]]:
    """The init epochs of the loss's terms, if any; returns each init epoch's mean losses."""
    loss, stage = training.loss, training.stage
    # RepDistiller's 30 init epochs precede 240; a run shorter than its init_epochs initializes for as many
    # epochs as it trains (logged), so that a quick run is not mostly initialization.
    epochs = min(loss.init_epochs, stage.recipe.epochs)
    if epochs == 0:
        return []
    if epochs < loss.init_epochs:
        log.info("%s: %d init epoch(s) (init_epochs=%d capped at the run's epochs)", stage.name, epochs,
                 loss.init_epochs)
    recipe, speed, student = stage.recipe, stage.speed, training.student
    if distributed.active() and speed.scaler is not None:
        raise KdrunError("the initialization phase of distill terms (init_epochs) cannot run with precision=fp16 "
                         "under torchrun: pass precision=bf16 (or fp32)")
    step_forward = getattr(training.step, "module", training.step).step_forward
    trains_student = loss.init_trains_student
    lr = loss.init_lr(recipe.lr)
    params = [p for p in [*student.parameters(), *loss.parameters()] if p.requires_grad]
    optimizer = build_optimizer(params, recipe.optim, lr)
    # Outside DDP's wrapper: each process's shard gradients are averaged before every step, as DDP does.
    optimizer.register_step_pre_hook(lambda *_: distributed.average_gradients(params))
    history = []
    for epoch in range(epochs):
        student.train(trains_student)
        loss.train()
        # Batch orders of their own (negative epochs), so the main epochs see the orders they would without it.
        batches = Batches(training.train_set, recipe.batch_size, stage.device, shuffle=True, seed=recipe.seed,
                          epoch=-(epoch + 1), num_workers=stage.num_workers, shard=distributed.shard())
        rows = []
        for images, labels, indices in batches:
            with speed.autocast():
                with torch.set_grad_enabled(trains_student):   # FT: the student's pass needs no graph
                    ctx = step_forward(speed.inputs(images), labels, indices, epoch)
                total, parts = loss.init_forward(ctx, epoch)
            speed.backward_and_step(total, optimizer)
            rows.append(torch.stack([total.detach(), *(v.detach() for v in parts.values())]))
        names = ["init_loss", *(f"init_loss_{name}" for name in parts)]
        values, _, _ = distributed.reduce_epoch(torch.stack(rows).float(), torch.zeros((), device=stage.device), 0)
        means = values.mean(0).cpu().tolist()
        if not all(torch.isfinite(torch.tensor(means))):
            raise KdrunError(f"{stage.name}: the initialization phase's loss is not finite in init epoch {epoch + 1}/"
                             f"{epochs} (lr {lr:g}): lower the learning rate or distill.terms.<name>.init_lr")
        record = dict(zip(names, means))
        history.append(record)
        log.info("%s init epoch %d/%d: loss %.4f (lr %g)", stage.name, epoch + 1, epochs, means[0], lr)
        if stage.writer is not None:
            for name, value in record.items():
                stage.writer.add_scalar(f"init/{name[len('init_'):]}", value, epoch + 1)
    distributed.sync_buffers(student)  # rank 0's BatchNorm statistics everywhere, as after every epoch
    distributed.sync_buffers(loss)
    return history

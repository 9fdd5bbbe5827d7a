"""DOT, the distillation-oriented trainer (Zhao, Cui, Song & Liang, ICCV 2023, arXiv:2307.08436): SGD with one
momentum buffer for the task loss's gradients (the cross-entropy terms) and another for the distillation
loss's gradients (every other term), the distillation one heavier:

    mu_task = momentum - delta,  mu_kd = momentum + delta
    v_task <- mu_task * v_task + (g_task + wd * w),   v_kd <- mu_kd * v_kd + g_kd,   w <- w - lr * (v_task + v_kd)

A parameter only one loss reaches (a feature adapter) keeps one buffer, with the plain momentum
(mu_task + mu_kd) / 2 and the weight decay on that buffer's gradient (a distillation-only one from its second
step on, as in the authors' code). A buffer starts as its first gradient.
The two gradients come from two backward passes over one forward (`backward_and_step`).
"""
from __future__ import annotations

from typing import Iterable, Mapping, Optional

import torch
from torch import nn

from kdrun.errors import KdrunError


class DistillationOrientedSGD(torch.optim.Optimizer):
    """`keep_distill_grads()` after the distillation loss's backward, then the task loss's backward, then `step()`."""

    def __init__(self, params: Iterable[nn.Parameter], lr: float, momentum: float = 0.9, delta: float = 0.075,
                 weight_decay: float = 0.0):
        if not (0 <= momentum - delta and momentum + delta < 1):
            raise ValueError(f"momentum - delta and momentum + delta must lie within [0, 1) (momentum={momentum}, "
                             f"delta={delta})")
        if weight_decay < 0:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        super().__init__(params, dict(lr=lr, momentum=momentum, delta=delta, weight_decay=weight_decay))
        self._distill_grads: dict[torch.Tensor, torch.Tensor] = {}   # this step's only: never in a checkpoint

    @torch.no_grad()
    def keep_distill_grads(self) -> None:
        """Set aside the gradients now in .grad as the distillation loss's."""
        self._distill_grads = {p: p.grad for group in self.param_groups for p in group["params"]
                               if p.grad is not None}

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            lr, decay = group["lr"], group["weight_decay"]
            mu_task, mu_kd = group["momentum"] - group["delta"], group["momentum"] + group["delta"]
            mu_alone = (mu_task + mu_kd) / 2   # a parameter that only one of the two losses reaches
            for p in group["params"]:
                task, distill = p.grad, self._distill_grads.get(p)
                state = self.state[p]
                if task is not None:
                    grad = task.add(p, alpha=decay) if decay else task
                    _accumulate(state, "task_momentum", grad, mu_task if distill is not None else mu_alone)
                if distill is not None:
                    # As the authors' trainer: a distillation-only parameter's decay starts at its second step.
                    alone = task is None and "distill_momentum" in state
                    grad = distill.add(p, alpha=decay) if decay and alone else distill
                    _accumulate(state, "distill_momentum", grad, mu_kd if task is not None else mu_alone)
                # Both updates from the weights before either (the decay terms read p above).
                if task is not None:
                    p.add_(state["task_momentum"], alpha=-lr)
                if distill is not None:
                    p.add_(state["distill_momentum"], alpha=-lr)
        self._distill_grads = {}
        return None


def _accumulate(state: dict, key: str, grad: torch.Tensor, momentum: float) -> None:
    if key not in state:
        state[key] = grad.detach().clone()
    else:
        state[key].mul_(momentum).add_(grad)


def task_terms(loss: nn.Module) -> list[str]:
    """The terms of a kdrun.distill.DistillLoss that are the task loss: cross-entropy on the labels."""
    from kdrun.distill.mutual import PeerCrossEntropyTerm
    from kdrun.distill.response import CrossEntropyTerm

    return [name for name, term in loss.terms.items() if isinstance(term, (CrossEntropyTerm, PeerCrossEntropyTerm))]


def split_loss(loss: nn.Module, parts: Mapping[str, torch.Tensor]) -> tuple[Optional[torch.Tensor],
                                                                              Optional[torch.Tensor]]:
    """(weighted task loss, weighted distillation loss); None for a side with no term."""
    task_names = set(task_terms(loss))
    task = [loss.weights[name] * value for name, value in parts.items() if name in task_names]
    distill = [loss.weights[name] * value for name, value in parts.items() if name not in task_names]
    return (sum(task) if task else None), (sum(distill) if distill else None)


def check_applies(loss: nn.Module, speed) -> None:
    """One line where DOT cannot train this stage."""
    from kdrun.engine import distributed

    if speed.scaler is not None:
        raise KdrunError("optim=dot takes two backward passes per step, which the fp16 gradient scaler does not "
                         "support: use precision=bf16 or precision=fp32, or optim=sgd")
    if distributed.active():
        raise KdrunError("optim=dot takes two backward passes per step, which DDP (torchrun) does not support: "
                         "run one process, or use optim=sgd")
    if len(loss.terms) > len(task_terms(loss)) and not task_terms(loss):
        raise KdrunError(f"optim=dot needs a cross-entropy (task) term beside the distillation terms, and this "
                         f"method has none with a weight > 0 (terms: {', '.join(loss.terms)}): give it a ce term "
                         "with a weight > 0 (distill=kd: alpha < 1), or use optim=sgd")


def backward_and_step(loss: nn.Module, parts: Mapping[str, torch.Tensor], optimizer: DistillationOrientedSGD,
                      speed) -> None:
    """The distillation loss's gradients, set aside; the task loss's; one DOT step with both. With no
    distillation term (the teacher and baseline stages) this is SGD with the plain momentum."""
    check_applies(loss, speed)
    task, distill = split_loss(loss, parts)
    optimizer.zero_grad(set_to_none=True)
    if distill is not None:
        distill.backward(retain_graph=task is not None)
        optimizer.keep_distill_grads()
        optimizer.zero_grad(set_to_none=True)
    if task is not None:
        task.backward()
    optimizer.step()


def optimizer_step(speed, optimizer: torch.optim.Optimizer, total: torch.Tensor, loss: nn.Module,
                   parts: Mapping[str, torch.Tensor]) -> None:
    """Backward and step for any optimizer: DOT needs the loss by parts, the others its total."""
    if isinstance(optimizer, DistillationOrientedSGD):
        backward_and_step(loss, parts, optimizer, speed)
    else:
        speed.backward_and_step(total, optimizer)

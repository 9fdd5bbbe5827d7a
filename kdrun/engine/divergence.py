"""Stopping a stage at the first non-finite loss, without making the host wait for the GPU every step.

Each step's loss values [total, term, term, ...] are kept on the device for logging anyway. On the
CPU they are checked at once (reading them costs nothing). On a GPU, reading a value would block the
host until the GPU catches up, every step; instead the values are copied to pinned host memory
asynchronously and checked as soon as an event query says the copy has landed (a query never
waits). A divergence is therefore noticed one or two steps after it happens, always before the
epoch's checkpoint is written, and reported at the step where it happened. Other devices are checked
once per epoch, before the checkpoint.
"""
from __future__ import annotations

import math
from collections import deque
from pathlib import Path
from typing import Iterable, Optional

import torch

from kdrun.errors import DivergedError
from kdrun.run_files import LAST_CHECKPOINT


class LossWatch:
    """One epoch's per-step loss rows; raises DivergedError at the first non-finite value."""

    def __init__(self, where: "Where", names: list[str], device: torch.device):
        self.where, self.names, self.device = where, names, device
        self.rows: list[torch.Tensor] = []
        self.lrs: list[float] = []
        self._pending: deque = deque()  # (step index, pinned host copy, cuda event)

    def add(self, row: torch.Tensor, lr: float) -> None:
        """`row`: the step's [total, *terms] on the device; `lr`: the learning rate the step used."""
        self.rows.append(row)
        self.lrs.append(lr)
        step = len(self.rows) - 1
        if self.device.type == "cpu":
            self._check(step, row)
        elif self.device.type == "cuda":
            host = torch.empty(row.shape, dtype=row.dtype, pin_memory=True)
            host.copy_(row, non_blocking=True)
            landed = torch.cuda.Event()
            landed.record()
            self._pending.append((step, host, landed))
            while self._pending and self._pending[0][2].query():
                done_step, done_host, _ = self._pending.popleft()
                self._check(done_step, done_host)

    def values(self) -> torch.Tensor:
        """All rows on the CPU (one transfer), every one of them checked."""
        values = torch.stack(self.rows).float().cpu()
        bad_rows = (~torch.isfinite(values)).any(dim=1).nonzero()
        if len(bad_rows):
            step = int(bad_rows[0])
            self._raise(step, values[step])
        return values

    def _check(self, step: int, row: torch.Tensor) -> None:
        if not bool(torch.isfinite(row).all()):
            self._raise(step, row.float().cpu())

    def _raise(self, step: int, row: torch.Tensor) -> None:
        bad = {name: _text(value) for name, value in zip(self.names, row.tolist()) if not math.isfinite(value)}
        terms = ", ".join(f"{name}={value}" for name, value in bad.items())
        raise self.where.diverged(f"{terms} at step {self.where.global_step(step)}", step, bad, self.lrs[step])


class Where:
    """The stage, epoch and checkpoint a divergence is reported against."""

    def __init__(self, stage: str, epoch: int, epochs: int, steps_per_epoch: int, checkpoint_dir: Path):
        self.stage, self.epoch, self.epochs = stage, epoch, epochs
        self.steps_per_epoch, self.checkpoint_dir = steps_per_epoch, checkpoint_dir

    def global_step(self, step_in_epoch: int) -> int:
        return self.epoch * self.steps_per_epoch + step_in_epoch + 1

    def diverged(self, what: str, step_in_epoch: Optional[int], terms: dict, lr: float) -> DivergedError:
        kept, kept_epoch = self._last_good()
        kept_text = f"kept {kept} (epoch {kept_epoch})" if kept else "no checkpoint was written yet"
        message = (f"{self.stage} diverged in epoch {self.epoch + 1}/{self.epochs}: {what}; {kept_text}; "
                   f"lower the learning rate (it was {lr:g}) or check the loss weights")
        step = self.global_step(step_in_epoch) if step_in_epoch is not None else None
        return DivergedError(message, {
            "stage": self.stage, "epoch": self.epoch + 1, "step": step, "terms": terms,
            "lr": lr, "last_good_checkpoint": str(kept) if kept else None, "last_good_epoch": kept_epoch})

    def _last_good(self) -> tuple[Optional[Path], Optional[int]]:
        """The checkpoint the run can go back to: written at the end of the previous epoch, if any."""
        last = self.checkpoint_dir / LAST_CHECKPOINT
        if self.epoch == 0 or not last.is_file():
            return None, None
        return last, self.epoch


def check_finite_weights(where: Where, modules: Iterable[torch.nn.Module], lr: float) -> None:
    """Before a checkpoint: a non-finite gradient can spoil the weights while every loss stayed finite.

    One reduction per tensor and a single host read per epoch.
    """
    named = [(name, tensor) for module in modules for name, tensor in module.state_dict().items()
             if tensor.is_floating_point()]
    if not named:
        return
    finite = torch.stack([torch.isfinite(tensor).all() for _, tensor in named]).cpu()
    if bool(finite.all()):
        return
    first = named[int((~finite).nonzero()[0])][0]
    raise where.diverged(f"the weights became non-finite ('{first}') although every loss was finite "
                         "(a non-finite gradient)", None, {first: "non-finite"}, lr)


def _text(value: float) -> str:
    return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")

"""Several processes (`torchrun --nproc_per_node=N -m kdrun ...`): DDP over NCCL on GPUs, gloo on CPUs.

Every process runs the whole experiment on its shard of each batch (see Batches' `shard`); DDP
averages the gradients, so with a global `batch_size` N processes take the same steps as one.
Rank 0 alone writes files; the others wait at barriers where rank 0 builds something they read.
In a plain run (no torchrun) every function here is a no-op.
"""
from __future__ import annotations

import atexit
import contextlib
from typing import Any, Callable, ContextManager

import torch
import torch.distributed as dist
from torch import nn

from kdrun.errors import KdrunError
from kdrun.engine.ranks import is_main, local_rank, rank, world_size

__all__ = ["setup", "active", "is_main", "shard", "wrap", "barrier", "from_rank_zero", "reduce_epoch",
           "sync_buffers", "average_gradients", "rank_zero_lock", "check_batch_size"]


def active() -> bool:
    return world_size() > 1 and dist.is_available() and dist.is_initialized()


def setup(device: torch.device, requested: str) -> torch.device:
    """Join the process group of a torchrun launch; returns the device of this process."""
    if world_size() == 1:
        return device
    if not dist.is_available():
        raise KdrunError("torchrun started several processes but this torch has no torch.distributed: "
                         "run kdrun without torchrun")
    if device.type == "cuda":
        if requested not in ("auto", "cuda"):
            raise KdrunError(f"device={requested} under torchrun: pass device=cuda (or auto); each process "
                             "takes the GPU of its LOCAL_RANK")
        if local_rank() >= torch.cuda.device_count():
            raise KdrunError(f"torchrun started process {local_rank()} on a machine with "
                             f"{torch.cuda.device_count()} GPU(s): pass --nproc_per_node={torch.cuda.device_count()}")
        device = torch.device("cuda", local_rank())
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise KdrunError(f"device={requested} cannot run several processes: use device=cuda (NCCL) or "
                         "device=cpu (gloo) under torchrun")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        atexit.register(_teardown)
    return device


def _teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def shard() -> tuple[int, int]:
    """(rank, world size) for Batches: which part of every global batch this process trains on."""
    return (rank(), world_size()) if active() else (0, 1)


def check_batch_size(batch_size: int) -> None:
    processes = world_size()
    if processes > 1 and batch_size % processes:
        raise KdrunError(f"batch_size={batch_size} is the global batch, split over {processes} processes: pass a "
                         f"multiple of {processes}, e.g. batch_size={max(processes, batch_size // processes * processes)}")


def wrap(module: nn.Module, device: torch.device) -> nn.Module:
    """DDP around the trainable module in a launch; the module itself otherwise.

    static_graph: the same parameters take part in every step, and a parameter no loss term reaches
    (e.g. an unused head) is tolerated instead of failing the second step.
    """
    if not active():
        return module
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=device_ids, static_graph=True)


def barrier() -> None:
    if active():
        dist.barrier()


def from_rank_zero(value: Any) -> Any:
    """Rank 0's `value` on every process (e.g. whether a cache entry exists, the run directory)."""
    if not active():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def rank_zero_lock(make_lock: Callable[[], ContextManager]) -> ContextManager:
    """The file lock on rank 0 only: the others must not queue behind it while rank 0 waits for them."""
    return make_lock() if is_main() else contextlib.nullcontext()


def reduce_epoch(step_values: torch.Tensor, correct: torch.Tensor, seen: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Per-step losses averaged over processes; correct predictions and sample counts summed."""
    if not active():
        return step_values, correct, seen
    packed = torch.cat([step_values.reshape(-1).float(), correct.reshape(1).float(),
                        torch.tensor([float(seen)], device=step_values.device)])
    dist.all_reduce(packed)  # SUM: gloo has no AVG
    processes = world_size()
    values = (packed[:-2] / processes).reshape(step_values.shape)
    return values, packed[-2].round().to(correct.dtype), int(packed[-1].round().item())


@torch.no_grad()
def average_gradients(params: list[nn.Parameter]) -> None:
    """Every process's gradients replaced by their mean, for a step DDP does not wrap (the init phase)."""
    if not active():
        return
    for param in params:
        if param.grad is not None:
            dist.all_reduce(param.grad)  # SUM: gloo has no AVG
            param.grad /= world_size()


@torch.no_grad()
def sync_buffers(model: nn.Module) -> None:
    """Rank 0's BatchNorm statistics everywhere, so every process evaluates and saves the same model."""
    if not active():
        return
    for buffer in model.buffers():
        dist.broadcast(buffer, src=0)


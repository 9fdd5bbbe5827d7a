"""What a model costs: parameters, FLOPs per image and measured speed on the run's device."""
from __future__ import annotations

import statistics
import time

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

WARMUP_RUNS = 2
TIMED_RUNS = 5


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_flops(model: nn.Module, input_shape: tuple[int, ...], device: torch.device) -> int:
    """FLOPs of one forward pass on one image, by torch's own counter (a multiply-add counts as 2)."""
    was_training = model.training
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, *input_shape, device=device))
    model.train(was_training)
    return int(counter.get_total_flops())


def _median_seconds(model: nn.Module, batch: torch.Tensor) -> float:
    def sync():
        if batch.device.type == "cuda":
            torch.cuda.synchronize(batch.device)

    timings = []
    with torch.inference_mode():
        for run in range(WARMUP_RUNS + TIMED_RUNS):
            sync()
            started = time.perf_counter()
            model(batch)
            sync()
            if run >= WARMUP_RUNS:
                timings.append(time.perf_counter() - started)
    return statistics.median(timings)


def measure_speed(model: nn.Module, input_shape: tuple[int, ...], batch_size: int, device: torch.device) -> dict:
    """Latency at batch 1 and throughput at `batch_size` (inference, medians after warm-up)."""
    was_training = model.training
    model.eval()
    latency = _median_seconds(model, torch.zeros(1, *input_shape, device=device))
    batch_time = _median_seconds(model, torch.zeros(batch_size, *input_shape, device=device))
    model.train(was_training)
    return {"latency_ms": 1000 * latency, "throughput": batch_size / batch_time}


def model_cost(model: nn.Module, input_shape: tuple[int, ...], batch_size: int, device: torch.device) -> dict:
    return {"params": count_parameters(model), "flops": count_flops(model, input_shape, device),
            **measure_speed(model, input_shape, batch_size, device)}


def timing_context(device: torch.device) -> dict:
    """Where the speed figures were measured, so runs on different machines are not compared blindly."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {"device": str(device), "device_name": name, "threads": torch.get_num_threads(),
            "warmup_runs": WARMUP_RUNS, "timed_runs": TIMED_RUNS}

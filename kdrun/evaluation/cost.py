"""What a model costs: parameters, FLOPs per image and measured speed on the run's device.

Speed figures move with the machine's load, so the models of a run are timed together: round after
round, each model runs once (the order reversed every other round), so a change of load hits all of
them alike and their ratio (the speed-up) holds even on a busy machine. Each figure is a median, and
its spread (interquartile range / median) says how far to trust it. On a CPU every model runs on one
thread: with several, a machine busy with other work stalls each operator on its slowest thread, and
identical runs of one model measured anywhere between 13 and 340 ms.
"""
from __future__ import annotations

import contextlib
import gc
import os
import statistics
import time
from typing import Callable, Hashable, Optional

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from kdrun.errors import KdrunError

WARMUP_RUNS = 2
MIN_RUNS = 5           # timed rounds, at least ...
MAX_RUNS = 25          # ... and at most, rounds being added while the budget lasts
BUDGET_SECONDS = 1.0   # per figure (latency, throughput), all models together; KDRUN_TIMING_BUDGET_S overrides it
BUDGET_VARIABLE = "KDRUN_TIMING_BUDGET_S"
UNRELIABLE_SPREAD = 0.25   # a figure whose interquartile range exceeds this fraction of its median


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


def spread(samples: list[float]) -> float:
    """Interquartile range relative to the median: 0.1 means the middle half of the runs lie within 10%."""
    if len(samples) < 2:
        return 0.0
    low, _, high = statistics.quantiles(samples, n=4, method="inclusive")
    return (high - low) / statistics.median(samples)


def timing_budget() -> float:
    """Seconds each figure may spend adding rounds beyond MIN_RUNS: BUDGET_SECONDS, or the environment's
    KDRUN_TIMING_BUDGET_S (0: MIN_RUNS rounds only, e.g. for a sweep of many tiny jobs, or the test suite)."""
    text = os.environ.get(BUDGET_VARIABLE, "").strip()
    if not text:
        return BUDGET_SECONDS
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise KdrunError(f"{BUDGET_VARIABLE}={text} must be a number of seconds >= 0, e.g. {BUDGET_VARIABLE}=1")
    return value


def timing_threads(device: torch.device) -> int:
    """The threads every model is timed with: one on a CPU (see above); the GPU does the work elsewhere."""
    return 1 if device.type == "cpu" else torch.get_num_threads()


def _eager():
    """Models compiled in place (compile=true) are timed uncompiled: timing them compiled would compile
    each again at batch 1, and only some of a run's models are compiled (a cached teacher is not)."""
    if hasattr(torch.compiler, "set_stance"):  # torch >= 2.6
        return torch.compiler.set_stance("force_eager")
    return contextlib.nullcontext()


@contextlib.contextmanager
def _steady(threads: int):
    """The same thread count for every model, and no garbage-collection pause inside a timed call."""
    previous, collecting = torch.get_num_threads(), gc.isenabled()
    torch.set_num_threads(threads)
    gc.collect()
    gc.disable()
    try:
        with _eager(), torch.inference_mode():
            yield
    finally:
        torch.set_num_threads(previous)
        if collecting:
            gc.enable()


def _alternate(calls: dict[Hashable, Callable[[], object]], sync: Callable[[], None]) -> dict[Hashable, list[float]]:
    """Seconds of each call, over rounds in which every call runs once (order reversed every other round)."""
    for call in calls.values():
        for _ in range(WARMUP_RUNS):
            call()
    timings: dict[Hashable, list[float]] = {label: [] for label in calls}
    order, rounds, started, budget = list(calls), 0, time.perf_counter(), timing_budget()
    while rounds < MIN_RUNS or (rounds < MAX_RUNS and time.perf_counter() - started < budget):
        for label in order if rounds % 2 == 0 else reversed(order):
            sync()
            begin = time.perf_counter()
            calls[label]()
            sync()
            timings[label].append(time.perf_counter() - begin)
        rounds += 1
    return timings


def time_models(models: dict[Hashable, nn.Module], input_shape: tuple[int, ...], batch_size: int,
                device: torch.device, threads: Optional[int] = None) -> dict[Hashable, dict]:
    """Latency at batch 1 and throughput at `batch_size` (inference) of several models, timed together.

    Per label: `latency_ms` and `throughput` (medians), `latency_spread` and `throughput_spread`
    (interquartile range / median), `timing_reliable` (both spreads within UNRELIABLE_SPREAD).
    """
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    modes = {label: model.training for label, model in models.items()}
    for model in models.values():
        model.eval()
    try:
        with _steady(threads or timing_threads(device)):
            one = torch.zeros(1, *input_shape, device=device)
            batch = torch.zeros(batch_size, *input_shape, device=device)
            latency = _alternate({label: (lambda m=m: m(one)) for label, m in models.items()}, sync)
            throughput = _alternate({label: (lambda m=m: m(batch)) for label, m in models.items()}, sync)
    finally:
        for label, model in models.items():
            model.train(modes[label])
    figures = {}
    for label in models:
        spreads = spread(latency[label]), spread(throughput[label])
        figures[label] = {"latency_ms": 1000 * statistics.median(latency[label]),
                          "latency_spread": round(spreads[0], 3),
                          "throughput": batch_size / statistics.median(throughput[label]),
                          "throughput_spread": round(spreads[1], 3),
                          "timing_reliable": max(spreads) <= UNRELIABLE_SPREAD}
    return figures


def measure_speed(model: nn.Module, input_shape: tuple[int, ...], batch_size: int, device: torch.device) -> dict:
    """One model's latency and throughput (time_models' figures); a run times its models together instead."""
    return time_models({"model": model}, input_shape, batch_size, device)["model"]


def combine_costs(costs: list[dict]) -> dict:
    """The cost of running several models one after another (an ensemble, a group of teachers): sums of
    params, FLOPs and latency; the spread of the sum is at most the widest member's."""
    combined = {"params": sum(c["params"] for c in costs), "flops": sum(c["flops"] for c in costs)}
    if all("latency_ms" in c for c in costs):
        combined.update(latency_ms=sum(c["latency_ms"] for c in costs),
                        latency_spread=max(c.get("latency_spread", 0.0) for c in costs),
                        throughput=1.0 / sum(1.0 / c["throughput"] for c in costs),
                        throughput_spread=max(c.get("throughput_spread", 0.0) for c in costs),
                        timing_reliable=all(c.get("timing_reliable", True) for c in costs))
    return combined


def timing_context(device: torch.device) -> dict:
    """Where and how the speed figures were measured, so runs on different machines are not compared blindly."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {"device": str(device), "device_name": name, "threads": timing_threads(device),
            "warmup_runs": WARMUP_RUNS, "timed_runs": MIN_RUNS, "max_timed_runs": MAX_RUNS,
            "interleaved": True, "unreliable_spread": UNRELIABLE_SPREAD}

"""Speed switches of a run: mixed precision, channels_last, torch.compile and cuDNN autotuning.

`precision=bf16|fp16` runs the student's and the teacher's forward passes and the loss under
autocast (weights and optimizer state stay fp32); fp16 adds a GradScaler so small gradients do
not flush to zero. Evaluation stays in fp32. `channels_last=true` stores conv weights and inputs
as NHWC (tensor cores and oneDNN prefer it); `compile=true` compiles the modules a step calls, in
place (`nn.Module.compile`), so state-dict keys and checkpoints are unchanged. Latency and
throughput are timed uncompiled (kdrun.evaluation.cost): compile=true speeds up training.
"""
from __future__ import annotations

import contextlib
import logging
import re
import weakref
from dataclasses import dataclass, field
from typing import Any, ContextManager, Optional

import torch
from torch import nn

from kdrun.errors import KdrunError

PRECISIONS = ("fp32", "bf16", "fp16")
_AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}

# Modules compiled in place share their class's `forward` code, and dynamo's recompile limit (8) counts
# per code object: a teacher and a student of one family, each in training (with gradients) and in
# evaluation (without), at full and at a last smaller batch, exhaust it and run eagerly from then on.
# Each compiled module gets the whole default allowance instead, as if its forward were its own.
_compiled: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()
_compiled_count = 0
_default_limit: Optional[int] = None


def _allow_recompiles(module: nn.Module) -> None:
    global _compiled_count, _default_limit
    if module in _compiled:
        return
    _compiled.add(module)
    _compiled_count += 1
    import torch._dynamo

    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"  # torch < 2.6
    if _default_limit is None:
        _default_limit = getattr(config, name)
    setattr(config, name, max(getattr(config, name), _default_limit * _compiled_count))


class _OneLineRecompileNotice(logging.Filter):
    """dynamo's six-line warning when a function still exceeds the limit, as one line, once per function."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "recompile_limit" not in message and "cache_size_limit" not in message:
            return True
        found = re.search(r"function: (.*)", message)
        function = found.group(1).strip() if found else "a compiled function"
        if function in self.seen:
            return False
        self.seen.add(function)
        record.msg, record.args = (f"compile=true: {function} was recompiled too often (torch._dynamo's "
                                   "recompile limit); it runs uncompiled from here on"), ()
        return True


def _notice_recompile_limit_once() -> None:
    dynamo_log = logging.getLogger("torch._dynamo.convert_frame")
    if not any(isinstance(f, _OneLineRecompileNotice) for f in dynamo_log.filters):
        dynamo_log.addFilter(_OneLineRecompileNotice())


@dataclass
class Speed:
    precision: str = "fp32"
    channels_last: bool = False
    compile: bool = False
    device_type: str = "cpu"
    scaler: Optional[Any] = field(default=None, repr=False)   # a GradScaler, fp16 only

    def __post_init__(self) -> None:
        if self.precision == "fp16" and self.scaler is None:
            self.scaler = torch.amp.GradScaler(self.device_type)

    @property
    def amp_dtype(self) -> Optional[torch.dtype]:
        return _AMP_DTYPES.get(self.precision)

    def autocast(self) -> ContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()  # fp32: not even a disabled autocast on the hot path
        return torch.autocast(self.device_type, dtype=self.amp_dtype)

    def prepare(self, module: Optional[nn.Module]) -> Optional[nn.Module]:
        """Memory format and compilation of a module a training step calls (in place)."""
        if module is None:
            return None
        if self.channels_last:
            module.to(memory_format=torch.channels_last)
        if self.compile:
            module.compile()
            _allow_recompiles(module)
        return module

    def inputs(self, images: torch.Tensor) -> torch.Tensor:
        if self.channels_last and images.dim() == 4:
            return images.contiguous(memory_format=torch.channels_last)
        return images

    def backward_and_step(self, total: torch.Tensor, optimizer: torch.optim.Optimizer) -> None:
        optimizer.zero_grad(set_to_none=True)
        if self.scaler is None:
            total.backward()
            optimizer.step()
            return
        self.scaler.scale(total).backward()
        self.scaler.step(optimizer)  # skipped when the scaled gradients overflowed
        self.scaler.update()

    def state_dict(self) -> Optional[dict]:
        return self.scaler.state_dict() if self.scaler is not None else None

    def load_state_dict(self, state: Optional[dict]) -> None:
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)


def build_speed(precision: str, channels_last: bool, compile: bool, device: torch.device) -> Speed:
    """Check the switches against the device (one-line errors) and turn on cuDNN autotuning on CUDA."""
    if precision not in PRECISIONS:
        raise KdrunError(f"precision={precision} is not one of {', '.join(PRECISIONS)}: pass e.g. precision=bf16")
    if precision == "fp16" and device.type != "cuda":
        raise KdrunError(f"precision=fp16 needs a CUDA GPU (device is {device}): use precision=bf16 or precision=fp32")
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise KdrunError(f"precision=bf16 is not supported by {torch.cuda.get_device_name(device)}: use "
                         "precision=fp16 or precision=fp32")
    if precision != "fp32" and device.type not in ("cuda", "cpu"):
        raise KdrunError(f"precision={precision} is not supported on {device}: use precision=fp32")
    if compile and not hasattr(nn.Module, "compile"):
        raise KdrunError(f"compile=true needs torch >= 2.2 (this is {torch.__version__}): upgrade torch or pass "
                         "compile=false")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input shapes: pick the fastest conv algorithms once
    if compile:
        _notice_recompile_limit_once()
    return Speed(precision, bool(channels_last), bool(compile), device.type)


def numerics_key(speed: Speed) -> dict:
    """What a cached stage's key adds for runs whose numbers differ from a plain fp32 single process:
    the autocast precision and the number of processes (BatchNorm sees a shard of each batch).
    Empty for the defaults, so existing cache entries keep their keys."""
    from kdrun.engine.ranks import world_size

    key = {}
    if speed.precision != "fp32":
        key["precision"] = speed.precision
    if world_size() > 1:
        key["processes"] = world_size()
    return key

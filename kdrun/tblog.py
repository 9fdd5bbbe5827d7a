"""TensorBoard event files, written with torch's SummaryWriter."""
from __future__ import annotations

from pathlib import Path

from torch.utils.tensorboard import SummaryWriter

from kdrun.ranks import is_main


class _NoWriter:
    """What processes other than rank 0 of a torchrun launch log to: nothing."""

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


def open_writer(log_dir: Path) -> SummaryWriter:
    if not is_main():
        return _NoWriter()
    Path(log_dir).mkdir(parents=True, exist_ok=True)
    return SummaryWriter(log_dir=str(log_dir))

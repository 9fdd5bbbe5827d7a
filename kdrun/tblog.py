"""TensorBoard event files, written with torch's SummaryWriter."""
from __future__ import annotations

from pathlib import Path

from torch.utils.tensorboard import SummaryWriter


def open_writer(log_dir: Path) -> SummaryWriter:
    Path(log_dir).mkdir(parents=True, exist_ok=True)
    return SummaryWriter(log_dir=str(log_dir))

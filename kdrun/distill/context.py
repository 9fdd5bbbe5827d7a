"""What a loss term sees at each training step."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class StepContext:
    student_logits: torch.Tensor
    targets: torch.Tensor
    indices: torch.Tensor
    teacher_logits: Optional[torch.Tensor] = None  # None when no term needs the teacher
    epoch: int = 0                                 # 0-based; some terms warm up over epochs

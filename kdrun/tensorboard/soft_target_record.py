"""soft_targets.json: the numbers behind the soft-target figures, for the interactive report page.

Beside metrics.json, for the `tb_figures` images the figures show: each image (a small PNG), its true
label, the class names, the teacher's logits, the run's T, and the student's logits after every epoch
(epoch 0: before training). Logits are the float32 values the models produced, written as the
shortest decimal that reads back as the same float32, so the page recomputes softmax(logits / T) at
any T from exactly what the models said. A few numbers per image and epoch: kilobytes.

Rewritten (atomically) after every epoch; a resumed run keeps the epochs it recorded before.
"""
from __future__ import annotations

import base64
import io
import json
import math
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from kdrun.run_files import SOFT_TARGETS_FILE, write_text_atomic

FORMAT = 1
IMAGE_PIXELS = 128   # longer side at most: the page shows a thumbnail, and the file stays small


def exact_floats(values: torch.Tensor) -> list:
    """float32 values as JSON numbers that read back as the same float32 (None where not finite)."""
    return [float(str(v)) if math.isfinite(v) else None for v in values.float().cpu().numpy().astype(np.float32)]


def png_base64(pixels: np.ndarray) -> str:
    """A (H, W) or (H, W, 3) image on the 0..1 scale as base64 PNG, shrunk to IMAGE_PIXELS at most."""
    from PIL import Image

    image = Image.fromarray(np.round(np.clip(pixels, 0, 1) * 255).astype(np.uint8))
    if max(image.size) > IMAGE_PIXELS:
        image.thumbnail((IMAGE_PIXELS, IMAGE_PIXELS))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


class SoftTargetRecord:
    """Writes soft_targets.json into `run_dir`; `add_epoch` after every epoch."""

    def __init__(self, run_dir: Path, T: float, class_names: list[str], positions: list[int], labels: list[int],
                 pixels: list[np.ndarray], teacher_logits: torch.Tensor):
        self.path = Path(run_dir) / SOFT_TARGETS_FILE
        self.data = {
            "format": FORMAT, "T": float(T), "class_names": [str(name) for name in class_names],
            "images": [{"position": position, "label": label, "png": png_base64(image),
                        "teacher_logits": exact_floats(logits)}
                       for position, label, image, logits in zip(positions, labels, pixels, teacher_logits)],
            "epochs": [],
        }
        self.data["epochs"] = self._earlier_epochs()

    def _earlier_epochs(self) -> list[dict]:
        """The epochs a previous, interrupted process of this run recorded, when it showed the same images."""
        try:
            previous = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return []
        same = all(previous.get(key) == self.data[key] for key in ("format", "T", "class_names", "images"))
        return list(previous.get("epochs", [])) if same else []

    def has_epoch(self, epoch: int) -> bool:
        return any(entry.get("epoch") == epoch for entry in self.data["epochs"])

    def add_epoch(self, epoch: int, student_logits: torch.Tensor) -> None:
        """The student's logits (one row per image) after `epoch` epochs (0: before training); later
        epochs of an earlier attempt are dropped, they belong to a history this run no longer has."""
        kept = [entry for entry in self.data["epochs"] if entry.get("epoch", math.inf) < epoch]
        self.data["epochs"] = kept + [{"epoch": epoch, "student_logits": [exact_floats(row) for row in student_logits]}]
        write_text_atomic(json.dumps(self.data, separators=(",", ":")), self.path)


def open_record(writer, T: float, class_names: list[str], positions: list[int], labels: list[int],
                pixels: list[np.ndarray], teacher_logits: torch.Tensor) -> Optional[SoftTargetRecord]:
    """The record of the run the writer writes (None for a writer without a directory: torchrun's other ranks)."""
    log_dir = writer.get_logdir() if hasattr(writer, "get_logdir") else None
    if not log_dir:
        return None
    return SoftTargetRecord(Path(log_dir), T, class_names, positions, labels, pixels, teacher_logits)

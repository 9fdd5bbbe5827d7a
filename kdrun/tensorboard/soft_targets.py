"""Per-epoch TensorBoard figures of the distill stage: what the teacher teaches on a few images.

For `tb_figures` fixed validation images (evenly spread over the test split), each epoch draws the
image, the teacher's probabilities at T=1, its soft targets at the run's T and the student's
probabilities at T (tags `soft_targets/image_<i>`). The teacher is frozen, so its outputs are computed
once; an epoch costs one forward pass of the student on these few images and a few small figures.
The same numbers go to soft_targets.json beside metrics.json (soft_target_record.py): the logits of
teacher and student per epoch, from which kdrun-report's page redraws the panels at any T.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

from kdrun.data import DataBundle
from kdrun.tensorboard.soft_target_record import open_record


def figure_positions(size: int, count: int) -> list[int]:
    """`count` positions spread evenly over a split of `size` items (sorted splits show several classes)."""
    count = min(count, size)
    return [i * size // count for i in range(count)]


def soft_target_logger(writer, data: DataBundle, student: nn.Module, teacher: nn.Module, T: float, count: int,
                       device: torch.device, alpha: Optional[float] = None) -> Optional[Callable[[int, dict], None]]:
    """The trainer's on_epoch callback that draws the figures, or None when `count` is 0. `alpha` joins T in
    the figures' titles, so the cards of a sweep's jobs tell themselves apart."""
    if count <= 0 or writer is None:
        return None
    from kdrun.tensorboard.figures import SoftTargetFigure, displayable

    positions = figure_positions(len(data.test), count)
    items = [data.test[i] for i in positions]
    images = torch.stack([image for image, _, _ in items]).to(device)
    labels = [int(label) for _, label, _ in items]
    with torch.no_grad():
        teacher_logits = teacher(images).float().cpu()
    teacher_t1, teacher_soft = teacher_logits.softmax(1), (teacher_logits / T).softmax(1)
    figures = [SoftTargetFigure(displayable(image, data.mean, data.std), label, data.class_names, teacher_t1[i],
                                teacher_soft[i], T, alpha) for i, ((image, _, _), label) in enumerate(zip(items, labels))]
    record = open_record(writer, T, data.class_names, positions, labels,
                         [displayable(image, data.mean, data.std) for image, _, _ in items], teacher_logits)

    def student_logits() -> torch.Tensor:
        was_training = student.training
        student.eval()
        with torch.no_grad():
            logits = student(images).float().cpu()
        student.train(was_training)
        return logits

    if record is not None and not record.has_epoch(0):
        record.add_epoch(0, student_logits())  # where the student starts

    def on_epoch(epoch: int, _: dict) -> None:
        logits = student_logits()
        if record is not None:
            record.add_epoch(epoch + 1, logits)
        student_soft = (logits / T).softmax(1)
        for i, figure in enumerate(figures):
            writer.add_image(f"soft_targets/image_{i}", figure.render(student_soft[i], epoch + 1), epoch + 1,
                             dataformats="HWC")
        writer.flush()

    return on_epoch

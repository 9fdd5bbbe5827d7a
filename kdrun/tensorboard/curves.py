"""Per-epoch curves of the distill stage beside the student's own `epoch/val_top1`.

- `epoch/teacher_val_top1`, `epoch/baseline_val_top1`: the teacher's and the baseline's real validation
  top-1 per epoch, from the histories of their stages (the stage cache keeps them in model.pt), so that
  "student vs baseline vs teacher" is one chart in the run itself, whatever logdir TensorBoard opens.
- `epoch/gain_over_baseline`, `epoch/agreement`, `epoch/kl_T`, `epoch/ece`: from the logits each epoch's
  validation already computed. The validation split is the test split, so each last value is the
  number metrics.json reports; the HParams tab reads these last values, and no single-point chart is
  needed for them.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from kdrun.evaluation.metrics import classification_metrics, fidelity_metrics

REFERENCE_TAG = "epoch/{}_val_top1"


def val_curve(history: list[dict]) -> list[float]:
    """Validation top-1 per epoch of a stage's history (its `val_top1` records)."""
    return [float(record["val_top1"]) for record in history or [] if "val_top1" in record]


def write_reference_curves(writer, curves: dict[str, list[float]]) -> None:
    """`epoch/<name>_val_top1` at epochs 1..n for each reference model's curve."""
    for name, values in curves.items():
        for epoch, value in enumerate(values, 1):
            writer.add_scalar(REFERENCE_TAG.format(name), value, epoch)
    writer.flush()


def validation_logger(writer, teacher_logits: Optional[torch.Tensor], T: float,
                      baseline_curve: Optional[list[float]]) -> Callable[[int, torch.Tensor, torch.Tensor], None]:
    """The trainer's on_validation callback: agreement and KL(T) with the teacher's validation logits (when
    given), ECE, and the gain over the baseline's top-1 at the same epoch (where the baseline has one)."""
    teacher = teacher_logits.float().cpu() if teacher_logits is not None else None

    def on_validation(epoch: int, logits: torch.Tensor, labels: torch.Tensor) -> None:
        logits, labels = logits.float().cpu(), labels.cpu()
        values = {"ece": classification_metrics(logits, labels)["ece"]}  # as metrics.json computes it
        if teacher is not None and teacher.shape == logits.shape:
            fidelity = fidelity_metrics(logits, teacher, T)
            values.update(agreement=fidelity["agreement"], kl_T=fidelity["kl_T"])
        if baseline_curve and epoch <= len(baseline_curve):
            top1 = (logits.argmax(1) == labels).float().mean().item()
            values["gain_over_baseline"] = top1 - baseline_curve[epoch - 1]
        for name, value in values.items():
            writer.add_scalar(f"epoch/{name}", value, epoch)
        writer.flush()

    return on_validation

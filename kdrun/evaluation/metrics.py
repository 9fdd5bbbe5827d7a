"""Metrics of a model's test-split predictions: accuracy, calibration and fidelity to the teacher.

Accuracy and calibration come from torchmetrics rather than being written again here.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torchmetrics.functional.classification import multiclass_accuracy, multiclass_calibration_error

ECE_BINS = 15


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """top-1, top-5 (top-k with k = min(5, classes)), NLL and 15-bin expected calibration error."""
    num_classes = logits.shape[1]
    top5_k = min(5, num_classes)
    return {
        "top1": multiclass_accuracy(logits, labels, num_classes, average="micro", top_k=1).item(),
        "top5": multiclass_accuracy(logits, labels, num_classes, average="micro", top_k=top5_k).item(),
        "nll": F.cross_entropy(logits, labels).item(),
        "ece": multiclass_calibration_error(logits.softmax(1), labels, num_classes, n_bins=ECE_BINS).item(),
    }


def fidelity_metrics(student_logits: torch.Tensor, teacher_logits: torch.Tensor, T: float) -> dict[str, float]:
    """How closely the student follows the teacher: top-1 agreement and KL(teacher || student)."""
    def kl(temperature: float) -> float:
        return F.kl_div(F.log_softmax(student_logits / temperature, 1), F.log_softmax(teacher_logits / temperature, 1),
                        reduction="batchmean", log_target=True).item()

    return {
        "agreement": (student_logits.argmax(1) == teacher_logits.argmax(1)).float().mean().item(),
        "kl_t1": kl(1.0),
        "kl_T": kl(T),
    }

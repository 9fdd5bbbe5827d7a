"""Inference over a whole split."""
from __future__ import annotations

import torch
from torch import nn

from kdrun.engine.loaders import Batches


@torch.no_grad()
def predict(model: nn.Module, dataset, batch_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (float32, on the CPU) and labels for every sample of `dataset`, in order."""
    was_training = model.training
    model.eval()
    logits, labels = [], []
    for images, targets, _ in Batches(dataset, batch_size, device, shuffle=False):
        logits.append(model(images).float().cpu())
        labels.append(targets.cpu())
    model.train(was_training)
    return torch.cat(logits), torch.cat(labels)

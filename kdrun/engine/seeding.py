"""`seed=`: every random generator kdrun and the libraries it calls draw from.

Model initialisation is seeded again right before each model is built (stages.py), shuffling
comes from a generator seeded with (seed, epoch) (engine/loaders.py) and resumed stages restore
the generators' states from their checkpoint (engine/trainer.py). Seeding Python's and NumPy's
generators here covers library code that draws from them (timm's and torchvision's augmentations).
Bit-identical results also need the same device, thread count and library versions; on a GPU,
cuDNN picks kernels that may differ between runs.
"""
from __future__ import annotations

import random

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # the CPU's and every GPU's generator

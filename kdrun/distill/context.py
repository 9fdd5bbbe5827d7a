"""What a loss term sees at each training step, and the shapes it is built for."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch


@dataclass
class StepContext:
    student_logits: torch.Tensor            # (B, K)
    targets: torch.Tensor                   # (B,) class indices
    indices: torch.Tensor                   # (B,) positions of the samples in the training set
    teacher_logits: Optional[torch.Tensor] = None  # None when no term needs the teacher
    epoch: int = 0                          # 0-based; some terms warm up over epochs
    # Filled only when a term sets needs_features = True; list i of the student is matched with
    # list i of the teacher (same spatial reduction where possible). Maps are (B, C, H, W).
    student_features: Optional[list[torch.Tensor]] = None
    teacher_features: Optional[list[torch.Tensor]] = None
    # Pooled penultimate features (B, D): what relation methods (RKD, PKT, CC, CRD) compare.
    student_embedding: Optional[torch.Tensor] = None
    teacher_embedding: Optional[torch.Tensor] = None
    # Filled with features when a term sets needs_teacher_classifier (SRD): the frozen teacher's layer that
    # maps its embedding to its logits, for the term to apply to student features (gradients flow through).
    teacher_classifier: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
    # Filled when the student or the teacher is a kdrun.engine.group.ModelGroup, one (B, K) tensor per member:
    peer_logits: Optional[list[torch.Tensor]] = None            # student peers, with gradients (online)
    teacher_group_logits: Optional[list[torch.Tensor]] = None   # teachers, no gradients (multi-teacher)
    # Filled when a term sets needs_strong_view (MLKD's prediction augmentation): both models' logits
    # on a strongly augmented view of the same images (kdrun/data/strong_view.py).
    student_logits_strong: Optional[torch.Tensor] = None
    teacher_logits_strong: Optional[torch.Tensor] = None
    # Filled when a term sets needs_head (kdrun/models/head.py): each model's final map (B, C, H, W), the one
    # its global pooling reduces, and its HeadSplit, whose pooled_head(v) and classifier(e) give logits from
    # pooled map vectors and from embeddings (call the teacher's under torch.no_grad() unless gradients must
    # flow through it to the student). The embeddings above are filled too.
    student_map: Optional[torch.Tensor] = None
    teacher_map: Optional[torch.Tensor] = None
    student_head: Optional[Any] = None      # kdrun.models.head.HeadSplit
    teacher_head: Optional[Any] = None
    # Filled when the student has a distillation token (DeiT, kdrun/distill/deit.py): its second head's logits;
    # student_logits is then the class head's.
    student_distill_logits: Optional[torch.Tensor] = None


@dataclass
class FeatureShapes:
    """Shapes a term with learnable parts (adapters, embeddings, memory banks) is built for.

    Measured once with a dummy batch before training, so every parameter exists before the
    optimizer is created (no lazy modules).
    """
    student_channels: list[int] = field(default_factory=list)
    teacher_channels: list[int] = field(default_factory=list)
    student_sizes: list[tuple[int, int]] = field(default_factory=list)   # (H, W) of each matched map
    teacher_sizes: list[tuple[int, int]] = field(default_factory=list)
    student_dim: int = 0                    # embedding width
    teacher_dim: int = 0
    num_classes: int = 0
    num_samples: int = 0                    # training-set size (CRD's memory bank)
    # Per matched teacher map: (bias, weight) of the BatchNorm that feeds its ReLU, where the maps are
    # pre-ReLU (kdrun.models.cifar_preact), else None. OFD's margins are read off them.
    teacher_bn: list[Optional[tuple[torch.Tensor, torch.Tensor]]] = field(default_factory=list)

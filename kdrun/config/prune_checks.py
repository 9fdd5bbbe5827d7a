"""Checks of prune= (conf/prune/, README "Pruning") before torch loads, and the student a pruning run trains.

Pure Python: the CLI runs these while composing, so a bad setting costs no model loading.
"""
from __future__ import annotations

import copy

from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from kdrun.config.paradigm_checks import paradigm_name
from kdrun.errors import KdrunError

SOURCES = ("teacher", "student")
IMPORTANCES = ("l2", "l1")


def pruning(cfg: DictConfig) -> bool:
    """Whether the run prunes its student (prune.ratio is set)."""
    prune = cfg.get("prune")
    return prune is not None and prune.get("ratio") is not None


def check_prune(cfg: DictConfig) -> None:
    if not pruning(cfg):
        return
    prune = cfg.prune
    ratio = prune.ratio
    if not 0.0 < ratio < 1.0:
        raise KdrunError(f"prune.ratio={ratio} must be strictly between 0 and 1 (the fraction of each layer's "
                         "channels removed), e.g. prune.ratio=0.5; prune=none turns pruning off")
    if prune.source not in SOURCES:
        raise KdrunError(f"prune.source={prune.source} must be teacher (a pruned copy of the trained teacher) or "
                         "student (the student preset, or its student.checkpoint weights)")
    if prune.importance not in IMPORTANCES:
        raise KdrunError(f"prune.importance={prune.importance} must be l2 or l1 (the weight norm that ranks channels)")
    if prune.finetune_epochs is not None and prune.finetune_epochs < 1:
        raise KdrunError(f"prune.finetune_epochs={prune.finetune_epochs} must be >= 1 (or null to train for "
                         "the student's epochs), e.g. prune.finetune_epochs=2")
    paradigm = paradigm_name(cfg)
    if paradigm not in ("offline", "baseline") or (paradigm == "baseline" and prune.source == "teacher"):
        raise KdrunError(f"prune.ratio with paradigm={paradigm}: pruning builds the student of paradigm=offline "
                         "(or of paradigm=baseline with prune.source=student); use one of those, or prune=none")
    if prune.source == "teacher":
        if cfg.teacher.get("outputs"):
            raise KdrunError("prune.source=teacher prunes the teacher model, but teacher.outputs is a file of its "
                             "outputs: pass teacher.checkpoint=PATH instead, or prune.source=student")
        if cfg.student.get("checkpoint"):
            raise KdrunError(f"prune.source=teacher builds the student from the teacher's weights, so "
                             f"student.checkpoint={cfg.student.checkpoint} would be unused: drop it, or prune "
                             "those weights with prune.source=student")
    elif prune.finetune_epochs is not None and not cfg.student.get("checkpoint"):
        raise KdrunError("prune.finetune_epochs fine-tunes a trained student once pruned: pass "
                         "student.checkpoint=PATH (e.g. a distilled student's checkpoints/best.pt), or "
                         "prune.finetune_epochs=null to train the pruned student for its epochs")


def student_config(cfg: DictConfig) -> DictConfig:
    """The config a pruning run trains: with prune.source=teacher the student is the teacher's architecture
    (its name and constructor kwargs; its weights come from the trained teacher), trained with the student's
    own epochs and lr. Other runs keep `cfg` as it is."""
    if not pruning(cfg) or cfg.prune.source != "teacher":
        return cfg
    cfg = copy.deepcopy(cfg)
    with open_dict(cfg), read_write(cfg):
        cfg.student.name = cfg.teacher.name
        cfg.student.kwargs = OmegaConf.to_container(cfg.teacher.kwargs, resolve=True)
        cfg.student.pretrained = False   # the trained teacher's weights are loaded before pruning
    return cfg

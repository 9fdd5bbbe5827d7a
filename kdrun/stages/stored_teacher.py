"""A teacher given by its stored outputs (teacher.outputs=PATH): no teacher model is built or run.

The file (kdrun.engine.teacher_file) is read and checked against the dataset once per process, before
any training; its training rows become the same TeacherOutputs the teacher-output cache serves
(engine/teacher_cache.py), so StepForward reads them by sample index exactly as it reads a cache entry.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
from omegaconf import DictConfig

from kdrun.data import DataBundle
from kdrun.distill import check_term, needs_features, needs_head
from kdrun.distill.response import CrossEntropyTerm
from kdrun.engine.teacher_cache import TeacherOutputs, check_cacheable
from kdrun.engine.teacher_file import (StoredFile, as_logits, check_against, in_dataset_order, read_outputs,
                                       sample_labels)
from kdrun.errors import KdrunError
from kdrun.evaluation.metrics import classification_metrics

log = logging.getLogger("kdrun")


@dataclass
class StoredTeacher:
    file: StoredFile
    train: TeacherOutputs                 # what the distill stage reads, by sample index
    test_logits: Optional[torch.Tensor]   # (N_test, K) in dataset order, as as_logits makes them; None: not stored

    @property
    def kind(self) -> str:
        return self.file.kind

    @property
    def name(self) -> str:
        return str(self.file.meta.get("teacher") or "stored outputs")


_loaded: dict[tuple, StoredTeacher] = {}   # (path, modified, dataset) -> the file, read once per process


def stored_teacher(cfg: DictConfig, data: DataBundle, device: torch.device) -> StoredTeacher:
    """teacher.outputs read and checked against `data` (one line per problem), then kept for the run."""
    path = Path(str(cfg.teacher.outputs)).expanduser()
    key = (str(path.resolve()), path.stat().st_mtime_ns, id(data), str(device))
    if key not in _loaded:
        _loaded.clear()  # one run, one file
        stored = read_outputs(path)
        check_against(stored, data)
        train = in_dataset_order(stored.splits["train"], as_logits(stored.splits["train"], stored.kind,
                                                                  data.num_classes), data.train)
        test = None
        if "test" in stored.splits:
            test = in_dataset_order(stored.splits["test"], as_logits(stored.splits["test"], stored.kind,
                                                                    data.num_classes), data.test)
        outputs = TeacherOutputs(train.to(device), None, None, path, reused=True)
        _loaded[key] = StoredTeacher(stored, outputs, test)
        log.info("teacher: stored outputs (%s%s) of %s from %s, %d train / %s test samples", stored.kind,
                 f", k={stored.k}" if stored.kind == "topk" else "", _loaded[key].name, path, len(train),
                 len(test) if test is not None else "no")
    return _loaded[key]


def check_stored_run(cfg: DictConfig, data: DataBundle, device: torch.device) -> None:
    """Before the preflight: the file against the dataset, and the method against what the file holds."""
    if cfg.teacher.export_outputs:
        check_cacheable(data.train, data.name, option="teacher.export_outputs=true",
                        fix="drop teacher.export_outputs")
        if cfg.teacher.export_kind == "topk" and cfg.teacher.export_k > data.num_classes:
            raise KdrunError(f"teacher.export_k={cfg.teacher.export_k} is more than the {data.num_classes} classes "
                             f"of dataset {data.name}: pass teacher.export_k={min(5, data.num_classes)} or smaller")
    if not cfg.teacher.outputs:
        return
    check_cacheable(data.train, data.name, option="teacher.outputs=PATH", fix="drop teacher.outputs")
    stored = stored_teacher(cfg, data, device)
    check_method(cfg.distill, stored.kind, str(cfg.teacher.outputs))


def check_method(distill_cfg: Mapping[str, Any], kind: str, path: str) -> None:
    from omegaconf import OmegaConf

    distill = OmegaConf.to_container(distill_cfg, resolve=True) if isinstance(distill_cfg, DictConfig) else distill_cfg
    method = distill.get("name", "custom")
    if needs_features(distill) or needs_head(distill):
        raise KdrunError(f"distill={method} needs a white-box teacher (its intermediate features or embeddings), but "
                         f"teacher.outputs={path} holds its outputs only: pick a logit method (kd, dkd, dist, mlkd, "
                         "hard) or give the teacher model (teacher.name / teacher.checkpoint)")
    if kind != "label":
        return
    for name, spec in distill["terms"].items():
        cls = check_term(name, spec)
        reads_label_only = cls is CrossEntropyTerm or getattr(cls, "reads_teacher_label_only", False)
        if spec.get("weight", 1.0) and not reads_label_only:
            raise KdrunError(f"teacher.outputs={path} holds the teacher's labels only (kind label), but "
                             f"distill={method} (term {name}) needs its probabilities: pass distill=hard (hard-label "
                             "distillation), or export logits or top-k probabilities (teacher.export_kind=logits|topk)")


def stored_teacher_metrics(stored: StoredTeacher, data: DataBundle) -> tuple[dict, torch.Tensor]:
    """The teacher's metrics.json entry (source outputs, kind, k; test metrics from its stored test outputs
    where the file has them) and the test split's true labels."""
    labels = sample_labels(data.test)
    metrics = {"name": stored.name, "source": "outputs", "path": str(stored.file.path), "outputs_kind": stored.kind,
               "k": stored.file.k}
    if stored.test_logits is None:
        return metrics, labels
    if stored.kind == "label":  # a label says nothing of confidence: accuracy only
        metrics["top1"] = (stored.test_logits.argmax(1) == labels).float().mean().item()
    else:
        metrics.update(classification_metrics(stored.test_logits, labels))
    return metrics, labels

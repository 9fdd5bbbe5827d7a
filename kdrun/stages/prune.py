"""The pruned student of a run (prune.ratio, README "Pruning"): which weights are pruned, how the stage cache
tells pruned students apart, and what the run reports about it.

    prune.source=teacher   the trained teacher (whatever obtained it: training, the stage cache, teacher.checkpoint)
    prune.source=student   the student preset: its seeded initial weights, or those of student.checkpoint
                           (an already distilled student, fine-tuned for prune.finetune_epochs afterwards)

Every build of the student in the run (the preflight's, the baseline's, the distilled one's, a resumed stage's)
prunes the same weights the same way, and the pruned shapes depend on the architecture and the ratio alone
(kdrun/models/prune.py): a checkpoint of the pruned student, written by this run, the stage cache or an
interrupted stage, always fits the model it is loaded into. Before the teacher is obtained (the preflight),
the teacher's architecture is pruned with its initial weights: the same shapes, for one training step.
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import nn

from kdrun.config.prune_checks import pruning
from kdrun.errors import KdrunError
from kdrun.models.prune import PruneReport, library_version, prune_model

log = logging.getLogger("kdrun")


@dataclass
class PruneState:
    """What a run's pruning knows as it goes: shared by the run's context and every context derived from it."""
    source_weights: Optional[dict] = None      # the trained teacher's state dict (prune.source=teacher)
    source_sha256: Optional[str] = None        # their content hash: part of the pruned stages' cache keys
    report: Optional[PruneReport] = None       # of the last pruning of trained weights
    restored: dict = field(default_factory=dict)   # role -> the pruning recipe of its (pruned) checkpoint
    logged: bool = False                       # the pruning of trained weights is logged once per run


def remember_teacher(ctx, teacher: nn.Module) -> None:
    """The trained teacher, whose pruned copy is the student of prune.source=teacher."""
    if not pruning(ctx.cfg) or ctx.cfg.prune.source != "teacher":
        return
    state = {k: v.detach().cpu().clone() for k, v in getattr(teacher, "_orig_mod", teacher).state_dict().items()}
    ctx.pruning.source_weights = state
    ctx.pruning.source_sha256 = state_sha256(state)


def state_sha256(state: dict[str, torch.Tensor]) -> str:
    """A hash of a state dict's names, shapes and values: the same weights give the same key on any machine."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def prune_student(ctx, model: nn.Module) -> nn.Module:
    """`model` (the source architecture, with student.checkpoint's weights where given) pruned in place:
    first given the trained teacher's weights (prune.source=teacher, once the teacher is obtained)."""
    prune = ctx.cfg.prune
    state = ctx.pruning
    trained = prune.source == "student" or state.source_weights is not None
    if prune.source == "teacher" and state.source_weights is not None:
        model.load_state_dict(state.source_weights)
    example = torch.zeros(2, ctx.data.in_chans, *ctx.data.image_size)
    label = f"{prune.source} {ctx.cfg.student.name}"
    report = prune_model(model, float(prune.ratio), example, ctx.data.num_classes, label,
                         str(prune.importance), list(prune.ignored_layers))
    if trained:
        state.report = report
        if not state.logged:
            state.logged = True
            log.info("prune: %s with %.0f%% of each layer's channels removed (%s importance): params %.2fM -> "
                     "%.2fM, channels %d -> %d", label, 100 * prune.ratio, prune.importance,
                     report.params_before / 1e6, report.params_after / 1e6, report.channels_before,
                     report.channels_after)
    return model


def cache_key(ctx) -> dict[str, Any]:
    """What the stage cache's key of a pruned student adds to its model spec (nothing without pruning)."""
    if not pruning(ctx.cfg):
        return {}
    prune = ctx.cfg.prune
    key = {"ratio": float(prune.ratio), "source": str(prune.source), "importance": str(prune.importance),
           "ignored_layers": list(prune.ignored_layers), "torch_pruning": library_version()}
    if prune.source == "teacher":   # the teacher's weights, by content: a retrained teacher is another key
        key["teacher_sha256"] = ctx.pruning.source_sha256
    return {"prune": key}


def checkpoint_meta(ctx, role: str) -> dict[str, Any]:
    """What the checkpoints of a pruned model in `role` record of how its architecture was made: the run's
    pruning, or that of the pruned checkpoint it started from."""
    if role in ctx.pruning.restored:
        return {"pruning": ctx.pruning.restored[role]}
    if role != "student" or not pruning(ctx.cfg):
        return {}
    prune = ctx.cfg.prune
    return {"pruning": {"ratio": float(prune.ratio), "source": str(prune.source),
                        "importance": str(prune.importance), "ignored_layers": list(prune.ignored_layers),
                        "torch_pruning": library_version()}}


def pruning_metrics(ctx, student: Optional[dict]) -> Optional[dict]:
    """metrics.json's `pruning`: the ratio asked for and achieved, params before and after (the run adds the
    FLOPs, latency and throughput of both models: kdrun.run.pruning)."""
    state = ctx.pruning
    if not pruning(ctx.cfg) or state.report is None:
        return None
    prune, report = ctx.cfg.prune, state.report
    return {"ratio": float(prune.ratio), "source": str(prune.source), "model": str(ctx.cfg.student.name),
            "from_checkpoint": ctx.cfg.student.get("checkpoint") if prune.source == "student" else None,
            "importance": str(prune.importance), "ignored_layers": list(prune.ignored_layers),
            "library": f"torch-pruning {library_version()}",
            "params_before": report.params_before, "params_after": report.params_after,
            "channels_before": report.channels_before, "channels_after": report.channels_after,
            "channel_ratio": report.channel_ratio,
            "params_ratio": report.params_after / report.params_before,
            "finetune_epochs": prune.get("finetune_epochs")}


def footer_line(pruned: dict) -> str:
    """One line under the table: what was pruned, and its cost before -> after."""
    before, after = pruned["before"], pruned["after"]
    latency = "n/a"
    if before.get("latency_ms") and after.get("latency_ms"):
        latency = (f"{before['latency_ms']:.2f} -> {after['latency_ms']:.2f} ms "
                   f"({before['latency_ms'] / after['latency_ms']:.2f}x)")
    return (f"pruning: {pruned['source']} {pruned['model']}, {100 * pruned['ratio']:g}% of each layer's channels "
            f"removed ({100 * pruned['channel_ratio']:.1f}% of all): params {pruned['params_before'] / 1e6:.2f}M -> "
            f"{pruned['params_after'] / 1e6:.2f}M, MFLOPs {pruned['flops_before'] / 1e6:.1f} -> "
            f"{pruned['flops_after'] / 1e6:.1f}, latency {latency}; top-1 once pruned, before training "
            f"{100 * pruned['pruned_top1']:.2f}%")


def restore_pruned(ctx, role: str, model: nn.Module) -> nn.Module:
    """`model` shaped like the checkpoint of `role` (teacher.checkpoint, student.checkpoint): a pruned student's
    checkpoint records its ratio, and the same pruning of a fresh model gives its shapes (the weights are loaded
    next). A checkpoint that is not pruned leaves `model` as it is."""
    from kdrun.engine.checkpoint import is_kdrun_checkpoint, read_checkpoint

    path = ctx.cfg[role].checkpoint
    saved = read_checkpoint(path, f"{role}.checkpoint")
    recipe = saved.get("pruning") if is_kdrun_checkpoint(saved) else None
    if not recipe:
        return model
    if role == "student" and pruning(ctx.cfg):
        raise KdrunError(f"student.checkpoint={path} is already pruned ({100 * recipe['ratio']:g}% of its channels "
                         "removed) and prune.ratio would prune it again, which kdrun does not do: pass prune=none to "
                         "fine-tune it as it is, or prune the unpruned student it came from")
    ctx.pruning.restored[role] = dict(recipe)
    example = torch.zeros(2, ctx.data.in_chans, *ctx.data.image_size)
    prune_model(model, float(recipe["ratio"]), example, ctx.data.num_classes, f"{role} {ctx.cfg[role].name}",
                str(recipe.get("importance", "l2")), list(recipe.get("ignored_layers") or []))
    return model

"""A run's context: its config, data, device and directory, and what the stages read from it by role.

The stages read models and recipes from the config by role (teacher, student, ...), so a paradigm puts
the model it wants into a role (`derive(ctx, student=assistant_cfg)`) instead of changing the stages.
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from torch import nn

from kdrun.config.prune_checks import pruning
from kdrun.config.schema import ModelConfig, stage_epochs, stage_lr
from kdrun.data import DataBundle
from kdrun.engine.checkpoint import load_model_weights
from kdrun.engine.speed import Speed
from kdrun.engine.trainer import Recipe
from kdrun.errors import KdrunError
from kdrun.models import check_model_name, create_model
from kdrun.paths import model_preset
from kdrun.stages.prune import PruneState, checkpoint_meta, prune_student, restore_pruned



def plain(node: Any) -> Any:
    """A config node as plain Python (resolved); anything else as it is."""
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


@dataclass
class RunContext:
    cfg: DictConfig
    data: DataBundle
    device: torch.device
    run_dir: Path
    progress: bool
    speed: Speed = field(default_factory=Speed)
    overrides: list[str] = field(default_factory=list)  # the command line's, kept in metrics.json
    pruning: PruneState = field(default_factory=PruneState)  # prune.ratio: the weights pruned, what it removed

    @property
    def data_workers(self) -> int:
        return int(self.cfg.dataset.get("num_workers", 0))

    @property
    def cache_root(self) -> Path:
        return Path(self.cfg.cache_dir).expanduser()

    def recipe(self, role: str) -> Recipe:
        cfg = self.cfg
        return Recipe(epochs=stage_epochs(cfg, role), lr=stage_lr(cfg, role), batch_size=cfg.batch_size,
                      optim=dict(plain(cfg.optim)), sched=dict(plain(cfg.sched)), seed=cfg.seed)

    def build_model(self, role: str) -> nn.Module:
        """The model in `role`, with the weights of its `checkpoint` where one is given (teacher.checkpoint,
        student.checkpoint: the baseline and the distilled student both start from it)."""
        model_cfg = self.cfg[role]
        # Seeding right before construction gives the baseline and the distilled student the same init.
        torch.manual_seed(self.cfg.seed)
        model = create_model(model_cfg.name, self.data.num_classes, self.data.in_chans,
                             pretrained=model_cfg.pretrained, role=role, image_size=self.data.image_size,
                             **plain(model_cfg.kwargs))
        if model_cfg.get("checkpoint"):
            model = restore_pruned(self, role, model)  # a pruned student's checkpoint: its shapes first
            load_model_weights(model, model_cfg.checkpoint, f"{role}.checkpoint", model_cfg.name,
                               self.data.num_classes)
        if role == "student" and pruning(self.cfg):  # prune.ratio: the student is a pruned model (README "Pruning")
            model = prune_student(self, model)
        return model

    def meta(self, role: str) -> dict:
        """What every checkpoint of the model in `role` carries (a pruned student: how it was pruned)."""
        return {**self.model_meta(self.cfg[role].name), **checkpoint_meta(self, role)}

    def model_meta(self, name: str) -> dict:
        """The same for a model that fills no role of the config (peers, an ensemble)."""
        return {"model_name": name, "num_classes": self.data.num_classes, "in_chans": self.data.in_chans,
                "dataset": self.data.name}


def derive(ctx: RunContext, run_dir: Optional[Path] = None, **cfg_updates: Any) -> RunContext:
    """A copy of `ctx` whose config has other values, e.g. derive(ctx, student=assistant_cfg)."""
    cfg = copy.deepcopy(ctx.cfg)
    for key, value in cfg_updates.items():
        # Model roles are typed (ModelConfig): a plain dict goes in as one.
        cfg[key] = OmegaConf.merge(OmegaConf.structured(ModelConfig), value) if isinstance(value, dict) else value
    return dataclasses.replace(ctx, cfg=cfg, run_dir=Path(run_dir) if run_dir is not None else ctx.run_dir)


def model_config(entry: Any, group: str) -> dict:
    """A full model config from a preset name (conf/model/NAME.yaml), any model name, or a mapping."""
    if isinstance(entry, str):
        node = model_preset(entry) or {"name": entry}
    else:
        node = entry
    try:
        merged = OmegaConf.merge(OmegaConf.structured(ModelConfig), node)
        config = OmegaConf.to_container(merged, resolve=True, throw_on_missing=True)
    except OmegaConfBaseException as error:
        raise KdrunError(f"bad model config {plain(entry)!r}: {str(error).splitlines()[0]}") from error
    check_model_name(config["name"], group)
    return config

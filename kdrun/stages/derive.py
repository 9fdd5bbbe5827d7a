"""What the paradigms share: run contexts with another model in a role, model configs from names, one
training stage through the trainer, and stand-alone model checkpoints."""
from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any, Callable, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from torch import nn

from kdrun.config.schema import ModelConfig
from kdrun.data.strong_view import strong_view_for
from kdrun.distill import DistillLoss
from kdrun.engine.checkpoint import FORMAT, save_atomic
from kdrun.engine.trainer import Stage, StageResult, train
from kdrun.errors import KdrunError
from kdrun.models import check_model_name
from kdrun.paths import conf_dir, group_options
from kdrun.stages.roles import RunContext
from kdrun.tensorboard.writer import open_writer


def derive(ctx: RunContext, run_dir: Optional[Path] = None, **cfg_updates: Any) -> RunContext:
    """A copy of `ctx` whose config has other values, e.g. derive(ctx, student=assistant_cfg).

    The stages (obtain_teacher, distill_student, the stage cache) read models and recipes from the
    config by role, so a paradigm puts the model it wants into the role instead of changing them.
    """
    cfg = copy.deepcopy(ctx.cfg)
    for key, value in cfg_updates.items():
        # Model roles are typed (ModelConfig): a plain dict goes in as one.
        cfg[key] = OmegaConf.merge(OmegaConf.structured(ModelConfig), value) if isinstance(value, dict) else value
    return dataclasses.replace(ctx, cfg=cfg, run_dir=Path(run_dir) if run_dir is not None else ctx.run_dir)


def plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, (DictConfig,)) else node


def model_config(entry: Any, group: str) -> dict:
    """A full model config from a preset name (conf/<group>/NAME.yaml), any model name, or a mapping."""
    if isinstance(entry, str):
        node = OmegaConf.load(conf_dir() / group / f"{entry}.yaml") if entry in group_options(group) \
            else {"name": entry}
    else:
        node = entry
    try:
        merged = OmegaConf.merge(OmegaConf.structured(ModelConfig), node)
        config = OmegaConf.to_container(merged, resolve=True, throw_on_missing=True)
    except OmegaConfBaseException as error:
        raise KdrunError(f"bad model config {plain(entry)!r}: {str(error).splitlines()[0]}") from error
    check_model_name(config["name"], group)
    return config


def model_meta(ctx: RunContext, name: str) -> dict:
    """What every checkpoint carries, for a model that fills no role of the config."""
    return {"model_name": name, "num_classes": ctx.data.num_classes, "in_chans": ctx.data.in_chans,
            "dataset": ctx.data.name}


def save_model(path: Path, model: nn.Module, meta: dict, stage: str, **extra: Any) -> None:
    """A kdrun checkpoint of one model, loadable with teacher.checkpoint=PATH (or student.checkpoint)."""
    save_atomic({"format": FORMAT, "version": 1, **meta, "stage": stage, "model": model.state_dict(), **extra},
                path)


def train_stage(ctx: RunContext, label: str, model: nn.Module, loss: DistillLoss, meta: dict,
                teacher: Optional[nn.Module] = None, reference: Optional[dict] = None, writer=None,
                on_epoch: Optional[Callable[[int, dict], None]] = None) -> StageResult:
    """Train `model` with the student recipe in ctx.run_dir (checkpoints/, TensorBoard), resuming a last.pt."""
    own_writer = writer is None
    writer = open_writer(ctx.run_dir) if own_writer else writer
    stage = Stage(label, ctx.recipe("student"), ctx.device, ctx.run_dir / "checkpoints", meta, writer,
                  ctx.progress, reference or {}, num_workers=ctx.data_workers, speed=ctx.speed)
    try:
        # resume=True continues only where a last.pt exists: an interrupted run rerun into its directory.
        return train(stage, model, loss, ctx.data.train, ctx.data.test, teacher=teacher, resume=True,
                     on_epoch=on_epoch, strong_view=strong_view_for(loss, ctx.data))
    finally:
        if own_writer:
            writer.close()

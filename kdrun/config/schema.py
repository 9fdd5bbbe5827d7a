"""The config schema (typed, checked by OmegaConf at compose time) and the semantic checks that run
before any training. Each check fails with a one-line KdrunError that says how to fix it."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from kdrun.errors import KdrunError
from kdrun.config.inputs import check_inputs


@dataclass
class ModelConfig:
    name: str = "???"
    pretrained: bool = False          # timm's pretrained weights (needs the hub)
    checkpoint: Optional[str] = None  # a kdrun checkpoint or a plain state dict
    epochs: Optional[int] = None      # None: the top-level `epochs`
    lr: Optional[float] = None        # None: the top-level `lr`
    kwargs: Dict[str, Any] = field(default_factory=dict)  # passed to the model constructor
    cache: bool = False               # teacher only: compute its outputs once and read them (engine/teacher_cache.py)
    cache_max_mb: float = 4096.0      # teacher only: largest cache (logits + features) to write


@dataclass
class KdrunConfig:
    teacher: ModelConfig = field(default_factory=ModelConfig)
    student: ModelConfig = field(default_factory=ModelConfig)
    dataset: Dict[str, Any] = field(default_factory=dict)
    distill: Dict[str, Any] = field(default_factory=dict)
    paradigm: Dict[str, Any] = field(default_factory=dict)   # conf/paradigm/: offline, online, self, ...
    teachers: List[Any] = field(default_factory=list)        # paradigm=multi_teacher: preset or model names
    assistant: ModelConfig = field(default_factory=ModelConfig)  # paradigm=assistant's middle model
    optim: Dict[str, Any] = field(default_factory=dict)
    sched: Dict[str, Any] = field(default_factory=dict)
    T: float = 4.0
    alpha: float = 0.9
    epochs: int = 3
    batch_size: int = 64
    lr: float = 1e-3
    seed: int = 0
    device: str = "auto"
    baseline: bool = True
    resume: bool = False
    cache_dir: str = "outputs/cache"
    progress: str = "auto"
    tb_figures: int = 4               # soft-target figures per epoch (images); 0: no figures
    precision: str = "fp32"           # fp32, bf16 or fp16 (autocast; fp16 adds a GradScaler, CUDA only)
    channels_last: bool = False
    compile: bool = False             # torch.compile of student and teacher
    lr_scaling: str = "none"          # none, or linear: lr * batch_size / lr_base_batch
    lr_base_batch: int = 64


def register_configs() -> None:
    """Put the schema in Hydra's ConfigStore (config.yaml lists it first in its defaults)."""
    ConfigStore.instance().store(name="kdrun_schema", node=KdrunConfig)
    # `${one_minus:${alpha}}` lets a method file weigh CE by (1 - alpha).
    OmegaConf.register_new_resolver("one_minus", lambda x: 1.0 - float(x), replace=True)


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise KdrunError(message)


def validate(cfg: DictConfig) -> None:
    """Semantic checks that the typed schema cannot express."""
    _check(cfg.T > 0, f"T={cfg.T} must be > 0: pass a positive temperature, e.g. T=4")
    _check(0.0 <= cfg.alpha <= 1.0, f"alpha={cfg.alpha} must be within [0, 1], e.g. alpha=0.9")
    _check(cfg.epochs >= 1, f"epochs={cfg.epochs} must be >= 1, e.g. epochs=3")
    _check(cfg.batch_size >= 1, f"batch_size={cfg.batch_size} must be >= 1, e.g. batch_size=128")
    _check(cfg.lr > 0, f"lr={cfg.lr} must be > 0, e.g. lr=0.05")
    _check(cfg.seed >= 0, f"seed={cfg.seed} must be >= 0")
    for role in ("teacher", "student"):
        model = cfg[role]
        _check(model.epochs is None or model.epochs >= 1,
               f"{role}.epochs={model.epochs} must be >= 1 (or null to use epochs={cfg.epochs})")
        _check(model.lr is None or model.lr > 0,
               f"{role}.lr={model.lr} must be > 0 (or null to use lr={cfg.lr})")
    _check(cfg.tb_figures >= 0, f"tb_figures={cfg.tb_figures} must be >= 0 (0 turns figures off), e.g. tb_figures=4")
    _check(str(cfg.progress).lower() in ("auto", "true", "false"),
           f"progress={cfg.progress} must be auto, true or false")
    _check(cfg.precision in ("fp32", "bf16", "fp16"),
           f"precision={cfg.precision} must be fp32, bf16 or fp16, e.g. precision=bf16")
    _check(not (cfg.precision == "fp16" and str(cfg.device).startswith("cpu")),  # also checked for device=auto
           "precision=fp16 needs a CUDA GPU (device is cpu): use precision=bf16 or precision=fp32")
    _check(cfg.lr_scaling in ("none", "linear"), f"lr_scaling={cfg.lr_scaling} must be none or linear")
    _check(cfg.lr_base_batch >= 1, f"lr_base_batch={cfg.lr_base_batch} must be >= 1, e.g. lr_base_batch=256")
    _check(not cfg.student.cache, "student.cache=true: only the teacher's outputs are cached; pass teacher.cache=true")
    _check(cfg.teacher.cache_max_mb > 0, f"teacher.cache_max_mb={cfg.teacher.cache_max_mb} must be > 0, e.g. 4096")
    _check("name" in cfg.dataset, "the dataset config has no `name`: pick one with dataset=NAME")
    _check("terms" in cfg.distill and len(cfg.distill.terms) > 0,
           "the distill config lists no loss terms: pick a method with distill=NAME, e.g. distill=kd")
    check_inputs(cfg)  # device, dataset name, checkpoint paths: still before any heavy import
    from kdrun.config.paradigm_checks import validate_paradigm  # pure Python: still before heavy imports

    validate_paradigm(cfg)


def stage_epochs(cfg: DictConfig, role: str) -> int:
    return int(cfg[role].epochs if cfg[role].epochs is not None else cfg.epochs)


def stage_lr(cfg: DictConfig, role: str) -> float:
    """The learning rate the stage trains with: its own or the top-level one, scaled by `lr_scaling`."""
    lr = float(cfg[role].lr if cfg[role].lr is not None else cfg.lr)
    if cfg.get("lr_scaling", "none") == "linear":  # Goyal et al. 2017: lr grows with the (global) batch
        lr *= cfg.batch_size / cfg.lr_base_batch
    return lr

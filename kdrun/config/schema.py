"""The config schema (typed, checked by OmegaConf at compose time) and the semantic checks that run
before any training. Each check fails with a one-line KdrunError that says how to fix it.

The groups' schemas are in groups.py; the model presets (conf/model/) fill the teacher, student and
assistant groups (register_configs()).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from kdrun.config.groups import (EXTRA_KEYS, SCHEMAS, DatasetConfig, DistillMethod, OptimConfig, ParadigmConfig,
                                 PruneConfig, QuantizeConfig, SchedConfig, keys_past_schema, schema_keys)
from kdrun.config.deploy_checks import check_deploy
from kdrun.config.inputs import check_inputs
from kdrun.config.prune_checks import check_prune, pruning
from kdrun.config.stored_teacher import check_stored_teacher
from kdrun.config.values import check_finite, check_values
from kdrun.errors import KdrunError
from kdrun.paths import MODEL_GROUPS, model_preset, preset_names
from kdrun.registry import did_you_mean


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
    # Stored teacher outputs (README "Stored teacher outputs", engine/teacher_file.py), teacher only:
    outputs: Optional[str] = None     # a teacher-outputs file read instead of building or running the teacher
    export_outputs: bool = False      # paradigm=teacher: also write the teacher's outputs to RUN_DIR/teacher_outputs.npz
    export_kind: str = "logits"       # what that file holds: logits, topk (ids + probabilities at T=1) or label
    export_k: int = 5                 # export_kind=topk: how many classes per sample


@dataclass
class KdrunConfig:
    # Groups: each option file names the schema of its family (groups.py), a subclass of the type here.
    teacher: ModelConfig = field(default_factory=ModelConfig)    # conf/model/ presets, or teacher.name=ANY
    student: ModelConfig = field(default_factory=ModelConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    distill: DistillMethod = field(default_factory=DistillMethod)
    paradigm: ParadigmConfig = field(default_factory=ParadigmConfig)  # conf/paradigm/: offline, online, self, ...
    teachers: List[Any] = field(default_factory=list)        # paradigm=multi_teacher: preset or model names
    assistant: ModelConfig = field(default_factory=ModelConfig)  # paradigm=assistant's middle model
    optim: OptimConfig = field(default_factory=OptimConfig)
    sched: SchedConfig = field(default_factory=SchedConfig)
    # The soft targets' temperature, read by the method files as ${T} (see groups.py for T's other homes:
    # paradigm.T of online, mlkd's own temperatures).
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
    # The shipped model (README "Export and quantization"): export=onnx, export=[onnx,program,torchscript]
    export: Any = None                # a format name or a list of them; none or null: no export
    quantize: QuantizeConfig = field(default_factory=QuantizeConfig)   # conf/quantize/: none, int8, qat
    prune: PruneConfig = field(default_factory=PruneConfig)   # conf/prune/: none, teacher, student, distilled


# Shuffling seeds a generator with seed * 100_003 + epoch (engine/loaders.py), which must fit in 64 bits.
MAX_SEED = 10**14

GROUP_FIELDS = ("teacher", "student", "assistant", "dataset", "distill", "paradigm", "optim", "sched", "quantize",
                "prune")


def register_configs() -> None:
    """Put the schemas and the model presets in Hydra's ConfigStore (config.yaml lists kdrun_schema first in its
    defaults; each group's option files name their schema/<group>/<family>)."""
    store = ConfigStore.instance()
    store.store(name="kdrun_schema", node=KdrunConfig, provider="kdrun")
    for group, schemas in SCHEMAS.items():
        for name, schema in schemas.items():
            store.store(group=f"schema/{group}", name=name, node=schema, provider="kdrun")
    # One set of model presets (conf/model/NAME.yaml), an option of each model group: teacher=resnet50,
    # student=mobilenetv3, assistant=resnet18 select conf/model/resnet50.yaml and so on.
    for name in preset_names():
        for group in MODEL_GROUPS:
            store.store(group=group, name=name, node=model_preset(name), provider="kdrun")
    # `${one_minus:${alpha}}` lets a method file weigh CE by (1 - alpha).
    OmegaConf.register_new_resolver("one_minus", lambda x: 1.0 - float(x), replace=True)


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise KdrunError(message)


def validate(cfg: DictConfig) -> None:
    """Semantic checks that the typed schema cannot express."""
    check_finite(cfg)  # first: `T=nan` is not a finite number, whatever else T must be
    _check(cfg.T > 0, f"T={cfg.T} must be > 0: pass a positive temperature, e.g. T=4")
    _check(0.0 <= cfg.alpha <= 1.0, f"alpha={cfg.alpha} must be within [0, 1], e.g. alpha=0.9")
    _check(cfg.epochs >= 1, f"epochs={cfg.epochs} must be >= 1, e.g. epochs=3")
    _check(cfg.batch_size >= 1, f"batch_size={cfg.batch_size} must be >= 1, e.g. batch_size=128")
    _check(cfg.lr > 0, f"lr={cfg.lr} must be > 0, e.g. lr=0.05")
    _check(cfg.seed >= 0, f"seed={cfg.seed} must be >= 0")
    _check(cfg.seed < MAX_SEED, f"seed={cfg.seed} must be < {MAX_SEED} (10**14), e.g. seed=0")
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
    check_group_keys(cfg)
    check_deploy(cfg)
    check_prune(cfg)
    check_values(cfg)  # optimizer, schedule, loader and loss-term values that reach torch
    check_inputs(cfg)  # device, dataset name, checkpoint paths: still before any heavy import
    check_stored_teacher(cfg)  # teacher.outputs / teacher.export_outputs
    from kdrun.config.paradigm_checks import validate_paradigm  # pure Python: still before heavy imports

    validate_paradigm(cfg)


def check_group_keys(cfg: DictConfig) -> None:
    """Keys that a group's schema lacks. OmegaConf rejects them at compose time (`dataset.augmnet=false`),
    but Hydra's `+KEY=VALUE` and `++KEY=VALUE` add them past the schema. A key of another option of the group
    (a sweep's shared setting) is a warning instead (paradigm_checks.unread_settings)."""
    for group in GROUP_FIELDS:
        node = cfg.get(group)
        schema = OmegaConf.get_type(node) if isinstance(node, DictConfig) else None
        if schema is None or not dataclasses.is_dataclass(schema):
            continue
        accepted = [*schema_keys(schema), *EXTRA_KEYS.get(group, ())]
        _, unknown = keys_past_schema(group, schema, node.keys())
        if unknown:
            name = "" if OmegaConf.is_missing(node, "name") else node.name
            raise KdrunError(f"unknown key(s) {', '.join(f'{group}.{key}' for key in unknown)} for {group} {name}; "
                             f"accepted keys: {', '.join(sorted(accepted))}{did_you_mean(unknown[0], accepted)}")


def stage_epochs(cfg: DictConfig, role: str) -> int:
    if role == "student" and pruning(cfg) and cfg.prune.get("finetune_epochs") is not None:
        return int(cfg.prune.finetune_epochs)   # the short fine-tune of a pruned student
    return int(cfg[role].epochs if cfg[role].epochs is not None else cfg.epochs)


def stage_lr(cfg: DictConfig, role: str) -> float:
    """The learning rate the stage trains with: its own or the top-level one, scaled by `lr_scaling`."""
    lr = float(cfg[role].lr if cfg[role].lr is not None else cfg.lr)
    if cfg.get("lr_scaling", "none") == "linear":  # Goyal et al. 2017: lr grows with the (global) batch
        lr *= cfg.batch_size / cfg.lr_base_batch
    return lr

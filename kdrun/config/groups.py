"""Typed schemas of the config groups: one dataclass per dataset family, optimizer, schedule and paradigm, and
the distillation method's. They are the one source of each key's type and default value.

The top-level schema (schema.py) types each group by its base class here (name only, or a method's terms);
each option file in conf/<group>/ names the schema of its family first in its defaults list,

    defaults:
      - /schema/dataset/torchvision@_here_   # kdrun.config.groups.TorchvisionDataset
      - _self_
    name: cifar10

so that OmegaConf rejects a misspelt key (`dataset.augmnet=false`) or a wrong type (`dataset.augment=maybe`)
at compose time, before anything runs; validate() rejects keys added with `+` that the schema lacks.
register_configs() stores these classes in Hydra's ConfigStore as schema/<group>/<key of SCHEMAS>.

Temperatures, which have three homes (the values stay where they are):
  - top-level `T`: the soft targets of `kd`, `dkd`, `dist` and `crd`'s optional `kd` term (the method files
    read it as `T: ${T}`); paradigms multi_teacher, self and assistant (through the method); KL(T) metrics and
    the soft-target figures;
  - `paradigm.T` (OnlineParadigm below): deep mutual learning's KL between peers, paradigm=online only
    (DML uses 1); the top-level T plays no part there;
  - `distill.terms.mlkd.temperatures`: MLKD's own list (the top-level T plays no part in mlkd);
  - a method's own fixed `T` where its authors fix one: `kd_ls`, `dkd_ls` (the LS base temperature 2), `nkd`
    (its lambda); `ctkd` learns its temperature (metrics.json's `temperatures` holds the final value).

Pure Python (no torch): the CLI composes and checks configs before torch loads; kdrun.data's builders read
their defaults from the dataset schemas.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Union

from omegaconf import MISSING


# --- datasets (conf/dataset/): one schema per family of builders in kdrun.data ---------------------------

@dataclass
class DatasetConfig:
    """What every dataset config has: its registered name (kdrun.data.registry.DATASETS), and the share of the
    training set held out for validation (kdrun/data/validation.py), which the builders never see."""
    name: str = MISSING
    val_split: float = 0.0            # 0: validate on the test split (as the papers); else a stratified fraction
    val_split_seed: int = 0           # of the training set, drawn with this seed, picks the best epoch


# Keys of every dataset config that kdrun.data applies after the builder (not passed to it).
VALIDATION_KEYS = ("val_split", "val_split_seed")


@dataclass
class EmbeddedDataset(DatasetConfig):
    """mnist5k, digits: shipped inside installed packages; a fixed, seeded, stratified split."""
    test_fraction: float = 0.2        # share of the samples in the test split, strictly between 0 and 1
    split_seed: int = 0


@dataclass
class TorchvisionDataset(DatasetConfig):
    """cifar10, cifar100, mnist, fashion_mnist: torchvision's files under `root`."""
    root: str = "data"                # relative paths start where kdrun was launched
    download: bool = False            # fetch missing files (needs the network)
    augment: bool = True              # CIFAR: random crop (padding 4) + flip; MNIST-like sets: none


@dataclass
class ImageFolderDataset(DatasetConfig):
    """imagefolder: ROOT/<train_dir>/<class>/*.jpg and ROOT/<val_dir>/<class>/*.jpg."""
    root: Optional[str] = None        # required: dataset.root=PATH
    train_dir: str = "train"
    val_dir: str = "val"
    image_size: int = 224
    augment: bool = True              # random resized crop + flip; evaluation: resize + center crop
    in_chans: int = 3                 # 3 (RGB) or 1 (grayscale)
    mean: Optional[List[float]] = None  # per channel; null: ImageNet's (grayscale: the average of its channels)
    std: Optional[List[float]] = None
    num_workers: int = 2              # DataLoader worker processes (also the decoding processes of a pack)
    pack: bool = False                # decode + resize once into a memory-mapped uint8 file; crop on the device
    pack_dir: str = "outputs/cache/packed"   # where packs live (relative: from the launch directory)


@dataclass
class SyntheticDataset(DatasetConfig):
    """synthetic: small learnable random images (a class pattern plus noise), for tests and smoke runs."""
    num_classes: int = 10
    train_size: int = 256
    test_size: int = 64
    image_size: int = 32
    in_chans: int = 3
    seed: int = 0


# Keys that any dataset config may carry for the runner (not the builder): `+dataset.num_workers=4`.
DATASET_RUNNER_KEYS = ("num_workers",)


# --- the distillation method (conf/distill/) --------------------------------------------------------------

@dataclass
class DistillMethod:
    """A method: named loss terms, each `{type: <registered term>, weight: w, <the term class's options>}`.

    The terms' options are checked against their classes (kdrun.distill.registry) once kdrun.distill loads,
    before any training: they differ per term type, so the schema holds them as plain mappings.
    """
    name: str = MISSING
    terms: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    student_layers: Optional[List[str]] = None   # feature methods: name layers to pair, instead of matching stages
    teacher_layers: Optional[List[str]] = None
    # A term weight its authors tuned per teacher/student pair, set by a conf/experiment/ file and read by the
    # method that uses it (reviewkd.yaml: `weight: ${oc.select:distill.pair_weights.reviewkd,1.0}`).
    pair_weights: Dict[str, float] = field(default_factory=dict)


@dataclass
class LogitStandardizedMethod(DistillMethod):
    """kd, dkd, mlkd and their LS presets: their terms read `${distill.logit_standardize}` (Sun et al., CVPR 2024)."""
    logit_standardize: bool = False


# --- optimizer (conf/optim/) and schedule (conf/sched/) ------------------------------------------------

@dataclass
class OptimConfig:
    name: str = MISSING


@dataclass
class SGDConfig(OptimConfig):
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5.0e-4


@dataclass
class DOTConfig(OptimConfig):
    """Distillation-oriented trainer (kdrun/engine/dot.py): task momentum - delta, distillation momentum + delta."""
    momentum: float = 0.9
    delta: float = 0.075
    weight_decay: float = 5.0e-4


@dataclass
class AdamWConfig(OptimConfig):
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.05


@dataclass
class SchedConfig:
    name: str = MISSING
    warmup_epochs: Union[int, float] = 0   # linear warm-up from lr / steps, stepped per batch (int or float:
                                           # an int keeps the stage-cache keys of earlier versions)


@dataclass
class MultiStepSchedConfig(SchedConfig):
    milestones: List[int] = field(default_factory=lambda: [150, 180, 210])   # epochs
    gamma: float = 0.1


# --- quantization of the shipped model (conf/quantize/) ----------------------------------------------

@dataclass
class QuantizeConfig:
    name: str = "none"          # none; int8: ONNX Runtime static int8 after training; qat: QatConfig
    calibration: int = 512      # training images that calibrate the activations' ranges


@dataclass
class QatConfig(QuantizeConfig):
    """quantize=qat: the distilled student fine-tuned with fake quantization, still distilling (its observers
    follow the training batches; `calibration` serves the post-training int8 model the run also reports)."""
    epochs: int = 2             # epochs of quantization-aware distillation after the fp32 distillation
    lr_scale: float = 0.01      # their lr: the student's lr times this (BatchNorm folded: small steps)


# --- structured pruning of the student (conf/prune/, README "Pruning") ----------------------------------

@dataclass
class PruneConfig:
    """prune.ratio=0.5: the student is the model of `source` with half of each layer's channels removed
    (Torch-Pruning, kdrun/models/prune.py), then trained (baseline) and distilled from the unpruned teacher."""
    ratio: Optional[float] = None     # the fraction of each layer's channels removed, in (0, 1); null: no pruning
    source: str = "teacher"           # teacher: a pruned copy of the trained teacher; student: of the student
                                      # (its student.checkpoint weights where given: a distilled student)
    importance: str = "l2"            # which channels go: those of the smallest l2 (or l1) weight norm
    ignored_layers: List[str] = field(default_factory=list)   # layers (module names) kept whole
    finetune_epochs: Optional[int] = None   # set: the pruned student's stages train this many epochs


# --- paradigms (conf/paradigm/) ------------------------------------------------------------------------

@dataclass
class ParadigmConfig:
    """offline, teacher, baseline, assistant: no settings of their own (assistant's model is `assistant`)."""
    name: str = MISSING


@dataclass
class OnlineParadigm(ParadigmConfig):
    """Deep mutual learning (Zhang et al., CVPR 2018)."""
    peers: Any = 2                    # a count (copies of the student), or a list of presets / model names
    T: float = 1.0                    # the peers' KL temperature; not the top-level T
    kl_weight: float = 1.0


@dataclass
class SelfParadigm(ParadigmConfig):
    """Born-again networks (Furlanello et al., ICML 2018)."""
    generations: int = 2
    ensemble: bool = False


@dataclass
class MultiTeacherParadigm(ParadigmConfig):
    """Several teachers' combined soft targets (the teachers are the top-level `teachers` list)."""
    weighting: str = "mean"           # mean | fixed | confidence
    weights: Optional[List[float]] = None   # weighting=fixed: one non-negative weight per teacher


# group -> {schema name in the ConfigStore (schema/<group>/<name>) -> class}
SCHEMAS: dict[str, dict[str, type]] = {
    "dataset": {"embedded": EmbeddedDataset, "torchvision": TorchvisionDataset, "imagefolder": ImageFolderDataset,
                "synthetic": SyntheticDataset},
    "distill": {"method": DistillMethod, "logit_standardized": LogitStandardizedMethod},
    "optim": {"sgd": SGDConfig, "adamw": AdamWConfig, "dot": DOTConfig},
    "sched": {"plain": SchedConfig, "multistep": MultiStepSchedConfig},
    "quantize": {"plain": QuantizeConfig, "qat": QatConfig},
    "prune": {"plain": PruneConfig},
    "paradigm": {"plain": ParadigmConfig, "online": OnlineParadigm, "self": SelfParadigm,
                 "multi_teacher": MultiTeacherParadigm},
}

# Keys a group's config may carry beyond its schema's fields.
EXTRA_KEYS: dict[str, tuple[str, ...]] = {"dataset": DATASET_RUNNER_KEYS}

# Groups whose options a sweep compares with shared settings (kdrun -m paradigm=online,multi_teacher
# ++paradigm.weighting=confidence): a key of another option's schema is ignored with a warning
# (paradigm_checks.unread_settings), not an error. Datasets stay strict: their builders never shared keys.
SHARED_KEY_GROUPS = ("distill", "optim", "sched", "paradigm")


def schema_keys(schema: type) -> list[str]:
    return [f.name for f in dataclasses.fields(schema)]


def schema_defaults(schema: type) -> dict[str, Any]:
    """The default of every field but `name`, e.g. for a builder called with a plain dict."""
    defaults = {}
    for f in dataclasses.fields(schema):
        if f.name == "name":
            continue
        defaults[f.name] = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    return defaults


def keys_past_schema(group: str, schema: type, keys: Iterable[str]) -> tuple[list[str], list[str]]:
    """Among `keys` that `schema` lacks: (those another option of the group reads, those none reads)."""
    own = {*schema_keys(schema), *EXTRA_KEYS.get(group, ())}
    others = set()
    if group in SHARED_KEY_GROUPS:
        others = {key for sibling in SCHEMAS.get(group, {}).values() for key in schema_keys(sibling)}
    extra = sorted(set(keys) - own)
    return [k for k in extra if k in others], [k for k in extra if k not in others]

"""Checks of the numbers a run hands to torch, judged from the config alone (pure Python, before torch loads).

- Every float anywhere in the config must be finite: `T=inf` or `distill.terms.kd.T=nan` would otherwise
  train whole stages and then fail (or blame the learning rate). One walk covers every group, present or future.
- The optimizer's, the schedule's and the data loader's values, which torch would refuse with a traceback
  (`optim.momentum=-1`) or accept and then misbehave with (`sched.gamma=-1`: a negative learning rate).
- The loss terms' weights and temperatures: a negative weight makes training maximize that term
  (`distill.terms.kd.weight=-5`), a temperature <= 0 divides by zero or flips the soft targets.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Iterator, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from kdrun.errors import KdrunError

# Term options (by term type) that weigh parts of the term's loss: negative ones maximize that part.
TERM_PART_WEIGHTS = {"dkd": ("alpha", "beta"), "dist": ("beta", "gamma"), "nkd": ("gamma",)}
# Term options that are temperatures (divisors of logits or similarities): > 0.
TERM_TEMPERATURES = ("T", "nce_t")
# Term options (by term type) that are probabilities strictly between 0 and 1 (a log of each is taken).
TERM_PROBABILITIES = {"tfkd_reg": ("a",)}


def check_values(cfg: DictConfig) -> None:
    """Everything here but check_finite, which validate() runs first of all."""
    check_optimizer(cfg.optim)
    check_schedule(cfg.sched)
    check_loader(cfg.dataset)
    check_term_values(cfg.distill)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# --- every float finite -----------------------------------------------------------------------------------

def _floats(node: Any, path: str) -> Iterator[tuple[str, float]]:
    """(key, value) of every float under `node` (plain containers), lists' items as KEY[i]."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _floats(value, f"{path}.{key}" if path else str(key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _floats(value, f"{path}[{i}]")
    elif isinstance(node, float):
        yield path, node


def check_finite(cfg: DictConfig) -> None:
    """One line for the first float that is inf or nan, named by the key the user typed: interpolations
    (`${T}`) are not resolved, so `T=inf` is reported as T, not as the method's `distill.terms.kd.T`."""
    plain = OmegaConf.to_container(cfg, resolve=False)
    for key, value in _floats(plain, ""):
        if not math.isfinite(value):
            default = _schema_default(cfg, key)
            example = f", e.g. {key}={default}" if default is not None else ""
            raise KdrunError(f"{key}={value} is not a finite number: pass a finite value{example}")


def _schema_default(cfg: DictConfig, key: str) -> Optional[float]:
    """The default of `key` in the schema of the node that holds it (a number), if there is one."""
    if "[" in key:
        return None
    parent_key, _, name = key.rpartition(".")
    try:
        parent = OmegaConf.select(cfg, parent_key) if parent_key else cfg
        schema = OmegaConf.get_type(parent) if isinstance(parent, DictConfig) else None
    except OmegaConfBaseException:
        return None
    if schema is None or not dataclasses.is_dataclass(schema):
        return None
    for field in dataclasses.fields(schema):
        if field.name == name and _is_number(field.default) and math.isfinite(field.default):
            return field.default
    return None


# --- optimizer, schedule, data loader ---------------------------------------------------------------------

def _require(condition: bool, message: str) -> None:
    if not condition:
        raise KdrunError(message)


def check_optimizer(optim: DictConfig) -> None:
    """The values torch.optim checks (and a few it lets through that can only diverge), per optimizer."""
    name = optim.get("name")
    decay = optim.get("weight_decay")
    if decay is not None:
        _require(decay >= 0, f"optim.weight_decay={decay} must be >= 0 (0: no decay), e.g. optim.weight_decay=5e-4")
    if name == "sgd":
        momentum = optim.get("momentum", 0.9)
        _require(0 <= momentum < 1, f"optim.momentum={momentum} must be within [0, 1), e.g. optim.momentum=0.9")
        _require(not (optim.get("nesterov", False) and momentum == 0),
                 "optim.nesterov=true needs optim.momentum > 0: pass optim.momentum=0.9 or optim.nesterov=false")
    if name == "dot":  # kdrun/engine/dot.py: the task and distillation momenta must both be momenta
        momentum, delta = optim.get("momentum", 0.9), optim.get("delta", 0.075)
        _require(delta >= 0 and 0 <= momentum - delta and momentum + delta < 1,
                 f"optim.momentum={momentum} and optim.delta={delta} must give momentum - delta >= 0 and "
                 "momentum + delta < 1 (delta >= 0), e.g. optim.momentum=0.9 optim.delta=0.075")
    if name == "adamw" and optim.get("betas") is not None:
        betas = list(optim.betas)
        _require(len(betas) == 2 and all(0 <= b < 1 for b in betas),
                 f"optim.betas={betas} must be two numbers within [0, 1), e.g. optim.betas=[0.9,0.999]")


def check_schedule(sched: DictConfig) -> None:
    warmup = sched.get("warmup_epochs", 0)
    _require(warmup >= 0, f"sched.warmup_epochs={warmup} must be >= 0 (0: no warm-up), e.g. sched.warmup_epochs=1")
    if sched.get("name") == "multistep":
        milestones = list(sched.get("milestones") or [])
        _require(all(m >= 0 for m in milestones),
                 f"sched.milestones={milestones} must be epochs >= 0, e.g. sched.milestones=[150,180,210]")
        gamma = sched.get("gamma", 0.1)
        _require(gamma > 0, f"sched.gamma={gamma} must be > 0 (the learning rate is multiplied by it at each "
                            "milestone), e.g. sched.gamma=0.1")


def check_loader(dataset: DictConfig) -> None:
    """`dataset.num_workers` (typed for imagefolder, `+dataset.num_workers=N` for any dataset): DataLoader processes;
    `dataset.val_split`: the held-out share of the training set."""
    val_split = dataset.get("val_split", 0.0)
    _require(0.0 <= val_split < 1.0, f"dataset.val_split={val_split} must be within [0, 1): the share of the training "
                                     "set held out for validation (0: validate on the test split), e.g. dataset.val_split=0.1")
    workers = dataset.get("num_workers")
    if workers is not None:
        _require(isinstance(workers, int) and not isinstance(workers, bool) and workers >= 0,
                 f"dataset.num_workers={workers!r} must be a whole number >= 0 (0: load in the main process), "
                 "e.g. dataset.num_workers=2")


# --- loss terms ---------------------------------------------------------------------------------------------

def check_term_values(distill: DictConfig) -> None:
    """Weights >= 0 and temperatures > 0 of every term (their other options: kdrun.distill's check_terms)."""
    try:
        terms = OmegaConf.to_container(distill.get("terms") or {}, resolve=True)
    except OmegaConfBaseException:
        return  # an interpolation that does not resolve: Hydra or the pipeline's term check names it
    for name, spec in terms.items():
        if not isinstance(spec, dict):
            continue  # not a mapping: kdrun.distill's check_terms says what a term must be
        key = f"distill.terms.{name}"
        kind = spec.get("type", name)
        weights = ["weight", *(k for k in spec if str(k).endswith("_weight")), *TERM_PART_WEIGHTS.get(kind, ())]
        for option in weights:
            value = spec.get(option)
            _require(not _is_number(value) or value >= 0,
                     f"{key}.{option}={value} is negative: training would maximize that loss instead of minimizing "
                     f"it; pass a weight >= 0 (0 turns it off)")
        for option in TERM_TEMPERATURES:
            value = spec.get(option)
            _require(not _is_number(value) or value > 0, f"{key}.{option}={value} must be > 0, e.g. {key}.{option}=4")
        for option in TERM_PROBABILITIES.get(kind, ()):
            value = spec.get(option)
            _require(not _is_number(value) or 0 < value < 1,
                     f"{key}.{option}={value} must be between 0 and 1 (exclusive), e.g. {key}.{option}=0.99")
        temperatures = spec.get("temperatures")
        if isinstance(temperatures, list):
            _require(len(temperatures) > 0 and all(_is_number(t) and t > 0 for t in temperatures),
                     f"{key}.temperatures={temperatures} must list numbers > 0, e.g. {key}.temperatures=[2,3,4,5,6]")
        warmup = spec.get("warmup_epochs")
        _require(not _is_number(warmup) or warmup >= 0,
                 f"{key}.warmup_epochs={warmup} must be >= 0 (0: no warm-up), e.g. {key}.warmup_epochs=1")

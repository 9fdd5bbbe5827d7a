"""Checks of the paradigm settings (conf/paradigm/*.yaml, `teachers`, `assistant`) before any training.

Their types are the schemas' (kdrun/config/groups.py: OmegaConf rejects `paradigm.ensemble=maybe` at compose
time); what is left here are the rules a type cannot say. Pure Python (no torch): the CLI calls these while
composing, so a bad setting costs no model loading.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from kdrun.config.groups import SHARED_KEY_GROUPS, keys_past_schema
from kdrun.errors import KdrunError
from kdrun.paths import group_options
from kdrun.registry import unknown_name

# The paradigm names before torch loads: the files of conf/paradigm/ (tests/test_registries.py keeps them equal
# to the paradigm registry).
PARADIGMS = tuple(group_options("paradigm"))
WEIGHTINGS = ("mean", "fixed", "confidence")


def paradigm_name(cfg: DictConfig) -> str:
    return str((cfg.get("paradigm") or {}).get("name", "offline"))


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _as_list(value: Any) -> list | None:
    return list(value) if isinstance(value, (list, tuple, ListConfig)) else None


def validate_paradigm(cfg: DictConfig) -> None:
    """One-line errors for every setting a paradigm cannot run with."""
    name = paradigm_name(cfg)
    if name not in PARADIGMS:
        raise KdrunError(unknown_name("paradigm", name, PARADIGMS, "paradigm=NAME"))
    settings = cfg.paradigm
    check = {"online": _check_online, "self": _check_self, "multi_teacher": _check_multi_teacher,
             "assistant": _check_assistant}.get(name)
    if check is not None:
        check(cfg, settings)


def unread_settings(cfg: DictConfig) -> list[str]:
    """Settings the chosen paradigm (or method, optimizer, schedule) ignores, as warnings (not errors: a sweep
    over paradigms shares them)."""
    name, notes = paradigm_name(cfg), []
    teachers = _as_list(cfg.get("teachers")) or []
    if teachers and name != "multi_teacher":
        notes.append(f"teachers={teachers} is read by paradigm=multi_teacher only and is ignored here "
                     f"(paradigm={name}); the teacher is teacher={cfg.teacher.name}")
    method = cfg.distill.get("name", "kd")
    if name in ("online", "multi_teacher") and method != "kd":
        notes.append(f"paradigm={name} has a loss of its own (see conf/paradigm/{name}.yaml); distill={method} "
                     "is ignored")
    for group in SHARED_KEY_GROUPS:  # e.g. ++paradigm.weighting=confidence in a sweep over paradigms
        node = cfg.get(group)
        schema = OmegaConf.get_type(node) if isinstance(node, DictConfig) else None
        if schema is not None and dataclasses.is_dataclass(schema):
            for key in keys_past_schema(group, schema, node.keys())[0]:
                notes.append(f"{group}.{key} is not a setting of {group}={node.get('name')} and is ignored here")
    return notes


def _check_online(cfg: DictConfig, settings: DictConfig) -> None:
    peers = settings.get("peers", 2)
    names = _as_list(peers)
    count = len(names) if names is not None else peers
    if not _is_number(count) or int(count) != count:
        raise KdrunError(f"paradigm.peers={peers} must be a count (e.g. 2) or a list of model names "
                         "(e.g. [resnet18,mobilenetv3])")
    if count < 2:
        raise KdrunError(f"paradigm=online needs at least 2 peers, got paradigm.peers={peers}: pass "
                         "paradigm.peers=2 or a list of two or more model names")
    if names is not None and not all(isinstance(n, str) and n for n in names):
        raise KdrunError(f"paradigm.peers={names} must list model names (presets or timm/torchvision/cifar names)")
    T, weight = settings.get("T", 1.0), settings.get("kl_weight", 1.0)
    if T <= 0:
        raise KdrunError(f"paradigm.T={T} must be > 0 (DML uses 1)")
    if weight < 0:
        raise KdrunError(f"paradigm.kl_weight={weight} must be >= 0 (DML uses 1)")


def _check_self(cfg: DictConfig, settings: DictConfig) -> None:
    generations = settings.get("generations", 2)
    if generations < 1:
        raise KdrunError(f"paradigm.generations={generations} must be a whole number >= 1, e.g. "
                         "paradigm.generations=3")


def _check_multi_teacher(cfg: DictConfig, settings: DictConfig) -> None:
    teachers = _as_list(cfg.get("teachers"))
    if not teachers:
        raise KdrunError("paradigm=multi_teacher needs a list of teachers: pass e.g. "
                         "teachers=[resnet50,efficientnet_b0]")
    for entry in teachers:
        if not (isinstance(entry, str) and entry) and not isinstance(entry, (dict, DictConfig)):
            raise KdrunError(f"teachers entry {entry!r} must be a preset or model name (or a model config "
                             "with a name), e.g. teachers=[resnet50,efficientnet_b0]")
    weighting = settings.get("weighting", "mean")
    if weighting not in WEIGHTINGS:
        raise KdrunError(f"paradigm.weighting={weighting} is unknown: choose one of {', '.join(WEIGHTINGS)}")
    weights = settings.get("weights")
    if weighting != "fixed":
        if weights is not None:
            raise KdrunError(f"paradigm.weights={list(weights)} is read only with paradigm.weighting=fixed "
                             f"(now {weighting}): add paradigm.weighting=fixed")
        return
    weights = _as_list(weights)
    if weights is None:
        raise KdrunError(f"paradigm.weighting=fixed needs paradigm.weights, one per teacher, e.g. "
                         f"paradigm.weights=[{','.join(['1'] * len(teachers))}]")
    if len(weights) != len(teachers):
        raise KdrunError(f"paradigm.weights has {len(weights)} values but there are {len(teachers)} teachers "
                         f"({', '.join(map(str, teachers))}): give one weight per teacher")
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise KdrunError(f"paradigm.weights={weights} must be non-negative numbers with a positive sum")


def _check_assistant(cfg: DictConfig, settings: DictConfig) -> None:
    assistant = cfg.get("assistant")
    if assistant is None or OmegaConf.is_missing(assistant, "name") or not assistant.get("name"):
        raise KdrunError("paradigm=assistant needs an assistant model: pass assistant=resnet18 or "
                         "assistant.name=ANY_MODEL")
    if assistant.get("checkpoint"):
        raise KdrunError(f"assistant.checkpoint={assistant.checkpoint} is not read: paradigm=assistant always "
                         "distils the assistant from the teacher; drop assistant.checkpoint")
    for key, rule in (("epochs", lambda v: v >= 1), ("lr", lambda v: v > 0)):
        value = assistant.get(key)
        if value is not None and not rule(value):
            raise KdrunError(f"assistant.{key}={value} must be {'>= 1' if key == 'epochs' else '> 0'} "
                             f"(or null to use {key}={cfg.get(key)})")

"""The loss-term registry and the check of a method's terms against it.

Every term class registers itself where it is defined, with its family (response, feature, relation, head: the terms that read a model through kdrun.models.head):

    @TERMS.register("kd", family="response")
    class KDTerm(nn.Module):
        def __init__(self, T: float = 4.0, logit_standardize: bool = False): ...

A method (conf/distill/NAME.yaml) lists terms by `type`; the options of a term are exactly its class's
constructor arguments, plus `type` and `weight`. kdrun passes `shapes` (the measured feature shapes) itself.
Adding a loss is one class here or in a new module of kdrun.distill (imported by the package on load) and
one YAML file in conf/distill/: no list to extend.
"""
from __future__ import annotations

import inspect
from typing import Any, Mapping, Optional

from kdrun.errors import KdrunError
from kdrun.registry import Registry, did_you_mean

TERMS = Registry("loss term type", "distill.terms.<name>.type")

CONFIG_KEYS = ("type", "weight")   # read by kdrun.distill, not passed to the term
SUPPLIED = ("shapes",)              # passed by kdrun (the measured feature shapes), never by the config


def _parameters(cls: type) -> list[inspect.Parameter]:
    return [p for name, p in inspect.signature(cls.__init__).parameters.items()
            if name != "self" and p.kind not in (p.VAR_POSITIONAL,)]


def term_options(cls: type) -> Optional[list[str]]:
    """The option names a term class takes from the config; None when it takes any (**kwargs)."""
    params = _parameters(cls)
    if any(p.kind == p.VAR_KEYWORD for p in params):
        return None
    return sorted(p.name for p in params if p.name not in SUPPLIED)


def takes_shapes(cls: type) -> bool:
    return "shapes" in inspect.signature(cls.__init__).parameters


def check_term(name: str, spec: Mapping[str, Any]) -> type:
    """The class of term `name` (its `type`, else its name), or one line naming the bad key and the accepted ones."""
    kind = spec.get("type", name)
    cls = TERMS.get(str(kind), where=f"distill.terms.{name}")
    weight = spec.get("weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)):
        raise KdrunError(f"distill.terms.{name}.weight={weight!r} must be a number, e.g. distill.terms.{name}.weight=1")
    accepted = term_options(cls)
    if accepted is None:
        return cls
    for key in spec:
        if key not in CONFIG_KEYS and key not in accepted:
            raise KdrunError(f"unknown option distill.terms.{name}.{key} for loss term type '{kind}': accepted keys are "
                             f"{', '.join([*CONFIG_KEYS, *accepted])}{did_you_mean(key, accepted)}")
    for param in _parameters(cls):
        if param.default is param.empty and param.name not in SUPPLIED and param.name not in spec:
            raise KdrunError(f"distill.terms.{name} (type {kind}) needs {param.name}: add "
                             f"+distill.terms.{name}.{param.name}=VALUE or set it in the method's file")
    return cls


def check_terms(distill_cfg: Mapping[str, Any]) -> None:
    """Every term of a method config against its registered class, before any model is built."""
    terms = distill_cfg.get("terms") or {}
    for name, spec in terms.items():
        if not isinstance(spec, Mapping):
            raise KdrunError(f"distill.terms.{name}={spec!r} must be a mapping with a type, e.g. "
                             f"+distill.terms.{name}='{{type: kd, weight: 0.5}}'")
        check_term(str(name), spec)

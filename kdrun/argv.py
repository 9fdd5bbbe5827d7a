"""Checks of the command line before Hydra composes it, for one-line errors and short model names.

`teacher=NAME` / `student=NAME` take a preset from conf/ or, when NAME is no preset but a timm,
torchvision or CIFAR model, are rewritten to `teacher.name=NAME` so any model works as typed.
"""
from __future__ import annotations

import difflib

from kdrun.errors import KdrunError
from kdrun.paths import group_options

CHECKED_GROUPS = ("teacher", "student", "dataset", "distill", "optim", "sched", "experiment", "paradigm", "assistant")
MODEL_GROUPS = ("teacher", "student", "assistant")
# With these, users add config dirs of their own, whose options kdrun cannot list here.
CUSTOM_CONFIG_FLAGS = ("--config-dir", "-cd", "--config-path", "-cp", "hydra.searchpath")


class ArgvError(KdrunError):
    pass


def preflight(args: list[str]) -> list[str]:
    if any(arg.startswith(CUSTOM_CONFIG_FLAGS) for arg in args):
        return args
    return [_check_group_override(arg) for arg in args]


def _check_group_override(arg: str) -> str:
    if arg.startswith("-") or "=" not in arg:
        return arg
    key, value = arg.split("=", 1)
    group = key.lstrip("+")
    if group not in CHECKED_GROUPS or not value:
        return arg
    options = group_options(group)
    values = [v.strip() for v in value.split(",")]
    unknown = [v for v in values if v not in options]
    if not unknown:
        return arg
    if group in MODEL_GROUPS and len(unknown) == len(values):
        from kdrun.models import check_model_name

        for name in values:
            check_model_name(name, group)  # raises with close matches
        return f"{group}.name={value}"
    if group in MODEL_GROUPS:
        raise ArgvError(f"{group}={value} mixes presets and model names: sweep over {group}.name=... instead")
    close = difflib.get_close_matches(unknown[0], options, n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    raise ArgvError(f"unknown {group} '{unknown[0]}': choose one of {', '.join(options)}{hint}")

"""Checks of the command line before Hydra composes it, for one-line errors and short model names.

`teacher=NAME` / `student=NAME` / `assistant=NAME` take a preset from conf/model/ or, when NAME is no preset
but a timm, torchvision or CIFAR model, are rewritten to `teacher.name=NAME` so any model works as typed.
The options of every group are the files of conf/ (paths.group_options), which Hydra composes from.
"""
from __future__ import annotations

import dataclasses
import difflib
from pathlib import Path

from kdrun.cli.hints import shell_quoted
from kdrun.cli.plugins import check_plugins
from kdrun.errors import KdrunError
from kdrun.paths import MODEL_GROUPS, config_groups, group_options
from kdrun.registry import unknown_name
from kdrun.run_files import run_is_live
from kdrun.sweeps.resume import resume_sweep_args

# With these, users add config dirs of their own, whose options kdrun cannot list here.
CUSTOM_CONFIG_FLAGS = ("--config-dir", "-cd", "--config-path", "-cp", "hydra.searchpath")
# Hydra's own flags (tests/test_errors.py compares them with Hydra's parser). Anything else that
# starts with '-' would get argparse's multi-line usage page instead of one line.
HYDRA_FLAGS = ("--help", "-h", "--hydra-help", "--version", "--cfg", "-c", "--resolve", "--package", "-p",
               "--run", "-r", "--multirun", "-m", "--shell-completion", "-sc", "--config-path", "-cp",
               "--config-name", "-cn", "--config-dir", "-cd", "--experimental-rerun", "--info", "-i")
FLAGS_WITH_VALUE = ("--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--config-name", "-cn",
                    "--config-dir", "-cd", "--experimental-rerun")
INFO_CHOICES = ("all", "config", "defaults", "defaults-tree", "plugins", "searchpath")


class ArgvError(KdrunError):
    pass


def preflight(args: list[str]) -> list[str]:
    for arg in args:
        _check_flag(arg)
    args = _flags_first(args)
    _check_bare_words(args)
    check_plugins(args)  # a launcher or sweeper from a pip extra that is not installed
    if not any(arg.startswith(CUSTOM_CONFIG_FLAGS) for arg in args):
        args = [_check_group_override(arg) for arg in args]
    args = resume_sweep_args(args)
    _check_not_running(args)
    return args


def _check_not_running(args: list[str]) -> None:
    """Hydra rewrites a run directory's .hydra/ before kdrun runs: refuse one that a live process runs first."""
    multirun = any(arg in ("-m", "--multirun") for arg in args)
    key = "hydra.sweep.dir=" if multirun else "hydra.run.dir="
    named = [arg.split("=", 1)[1] for arg in args if arg.lstrip("+").startswith(key)]
    if not named or "${" in named[-1]:
        return
    directory = Path(named[-1]).expanduser()
    live = [directory] if not multirun else [job for job in sorted(directory.glob("*")) if job.is_dir()]
    for run_dir in live:
        if run_is_live(run_dir):
            raise ArgvError(f"{run_dir} is in use by a running kdrun: wait for it to end, or write elsewhere "
                            f"with {key}DIR")


def _check_flag(arg: str) -> None:
    if not arg.startswith("-") or _is_number(arg):
        return
    flag = arg.split("=", 1)[0]
    if flag not in HYDRA_FLAGS:
        close = difflib.get_close_matches(flag, HYDRA_FLAGS, n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise ArgvError(f"unknown option '{flag}': {hint}kdrun takes KEY=VALUE overrides and Hydra's flags "
                        "(-m, --cfg job, --config-dir DIR, ...); see kdrun --help")


def _flags_first(args: list[str]) -> list[str]:
    """Hydra's parser takes flags only before the overrides (`kdrun T=1 -m T=2,4` would fail with
    argparse's usage page); move them, with their values, to the front."""
    flags, overrides = [], []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg.startswith("-") and not _is_number(arg):
            flags.append(arg)
            takes_value = arg in FLAGS_WITH_VALUE or (arg in ("--info", "-i") and i + 1 < len(args)
                                                      and args[i + 1] in INFO_CHOICES)
            if takes_value and i + 1 < len(args):
                flags.append(args[i + 1])
                i += 1
        else:
            overrides.append(arg)
        i += 1
    return flags + overrides


def _check_bare_words(args: list[str]) -> None:
    """A word that is no KEY=VALUE (nor ~KEY) is mostly a value the shell split at a space: say how to quote it."""
    previous = None
    for i, arg in enumerate(args):
        flag_value = i > 0 and args[i - 1] in FLAGS_WITH_VALUE + ("--info", "-i")
        if arg.startswith(("-", "~")) or "=" in arg or flag_value:
            previous = arg if "=" in arg and not arg.startswith("-") else None
            continue
        if previous is not None and not _is_known_key(arg):
            key = previous.split("=", 1)[0]
            whole = f"{previous} {arg}"
            raise ArgvError(f"'{arg}' is not KEY=VALUE: if it is part of {key}'s value, quote the whole override "
                            f"for the shell: kdrun {shell_quoted(whole)}")
        raise ArgvError(f"'{arg}' is not an override: write KEY=VALUE (e.g. {arg}=VALUE); "
                        "kdrun --help lists the keys and config groups")


def _is_known_key(word: str) -> bool:
    """A config group or top-level key (`kdrun teacher resnet50`): the user left out the '='."""
    from kdrun.config.schema import KdrunConfig

    return word in config_groups() or word in {f.name for f in dataclasses.fields(KdrunConfig)}


def _is_number(arg: str) -> bool:
    try:
        float(arg)
    except ValueError:
        return False
    return True


def _check_group_override(arg: str) -> str:
    if arg.startswith("-") or "=" not in arg:
        return arg
    key, value = arg.split("=", 1)
    group = key.lstrip("+")
    if group not in config_groups() or not value:
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
    raise ArgvError(unknown_name(group, unknown[0], options, f"{group}=NAME"))

"""Hydra's launcher and sweeper plugins are optional extras: name the one to install when it is missing.

Without the check Hydra answers `hydra/launcher=joblib` with "Could not find 'hydra/launcher/joblib'",
which does not say that a pip package is missing, nor which one.
"""
from __future__ import annotations

import importlib.util
from typing import Optional

from kdrun.errors import KdrunError

# extra name -> its pip package and the modules that package brings (the plugin and the library behind it)
EXTRAS = {
    "joblib": ("hydra-joblib-launcher", ("hydra_plugins.hydra_joblib_launcher", "joblib")),
    "slurm": ("hydra-submitit-launcher", ("hydra_plugins.hydra_submitit_launcher", "submitit")),
    "optuna": ("hydra-optuna-sweeper", ("hydra_plugins.hydra_optuna_sweeper", "optuna")),
}
# (override key, option) -> extra; None as option: every option of the group
OPTION_EXTRAS = {
    ("hydra/launcher", "joblib"): "joblib",
    ("hydra/launcher", "submitit_local"): "slurm",
    ("hydra/launcher", "submitit_slurm"): "slurm",
    ("hydra/launcher", "kdrun_slurm"): "slurm",
    ("hydra/sweeper", "optuna"): "optuna",
    ("hparams_search", None): "optuna",  # every preset in conf/hparams_search/ switches to Optuna
}


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package that is missing or broken
        return False


def required_extra(arg: str) -> Optional[str]:
    """The extra that a command-line override such as `hydra/launcher=joblib` needs, if any."""
    if arg.startswith("-") or "=" not in arg:
        return None
    key, value = arg.split("=", 1)
    key = key.lstrip("+~")
    for (wanted_key, option), extra in OPTION_EXTRAS.items():
        if key == wanted_key and (option is None or value.strip() == option):
            return extra
    return None


def check_plugins(args: list[str]) -> None:
    """Raise one line naming the extra to install when an override needs a plugin that is missing."""
    for arg in args:
        extra = required_extra(arg)
        if extra is None:
            continue
        package, modules = EXTRAS[extra]
        if not all(_installed(module) for module in modules):
            raise KdrunError(f'{arg} needs the Hydra plugin {package}, which is not installed: '
                             f'pip install "kdrun[{extra}]"')

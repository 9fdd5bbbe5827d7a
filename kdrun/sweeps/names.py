"""Sweep job directories named after what the sweep varies: `3_T=4,alpha=0.9`, not every override."""
from __future__ import annotations

import os
import re
import sys
from typing import Iterable, Mapping, Optional

# Hydra's sweep syntax: a,b,c  range(...)  choice(...)  glob(...)  interval(...)
SWEPT_KEYS_ENV = "KDRUN_SWEPT_KEYS"
_SWEEP_FUNCTION = re.compile(r"^(range|choice|glob|interval|tag)\(")


def _is_sweep_value(value: str) -> bool:
    depth = 0
    for char in value:
        depth += char in "[({"
        depth -= char in "])}"
        if char == "," and depth == 0:
            return True
    return bool(_SWEEP_FUNCTION.match(value))


def swept_keys(argv: Iterable[str]) -> set[str]:
    keys = set()
    for arg in argv:
        if "=" in arg and not arg.startswith("-"):
            key, value = arg.split("=", 1)
            if _is_sweep_value(value):
                keys.add(key.lstrip("+~"))
    return keys


def remember_swept_keys(argv: Iterable[str]) -> None:
    """Called where the sweep starts: jobs that run in other processes (submitit) see another sys.argv."""
    os.environ[SWEPT_KEYS_ENV] = ",".join(sorted(swept_keys(argv)))


def job_dirname(overrides: Iterable[str], sweeper_params: Optional[Mapping] = None) -> str:
    """The job's overrides of swept keys, or all of them when the sweep's keys are unknown.

    Swept keys: those given several values on the command line, and the keys of hydra.sweeper.params
    (an Optuna search space, e.g. T and alpha).
    """
    overrides = [str(o) for o in overrides]
    remembered = os.environ.get(SWEPT_KEYS_ENV)
    keys = set(remembered.split(",")) if remembered else swept_keys(sys.argv[1:])
    keys |= {str(key).lstrip("+~") for key in (sweeper_params or {})}
    chosen = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") in keys] or overrides
    # Keep the name a single, portable path component (Hydra escapes ':' in sweep values as '\:').
    return ",".join(sorted(chosen)).replace("\\", "").replace("/", "_").replace(":", "_")[:200]


def register_resolver() -> None:
    """`${sweep_job_dirname:...}` in conf/config.yaml's hydra.sweep.subdir names each job's directory."""
    from omegaconf import OmegaConf

    OmegaConf.register_new_resolver("sweep_job_dirname", job_dirname, replace=True)

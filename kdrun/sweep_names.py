"""Sweep job directories named after what the sweep varies: `3_T=4,alpha=0.9`, not every override."""
from __future__ import annotations

import re
import sys
from typing import Iterable

# Hydra's sweep syntax: a,b,c  range(...)  choice(...)  glob(...)  interval(...)
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


def job_dirname(overrides: Iterable[str]) -> str:
    """The job's overrides of swept keys, or all of them when the sweep's keys are unknown."""
    overrides = [str(o) for o in overrides]
    keys = swept_keys(sys.argv[1:])
    chosen = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") in keys] or overrides
    # Keep the name a single, portable path component.
    return ",".join(sorted(chosen)).replace("/", "_").replace(":", "_")[:200]

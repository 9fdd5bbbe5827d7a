"""Reading a dataset's config keys: defaults and accepted keys from its schema, value checks and paths.

The keys, their types and defaults are the dataset's schema (kdrun/config/groups.py), which OmegaConf already
checks when the CLI composes the config; a builder called with a plain dict gets the same accepted keys here.
Every failure is a one-line KdrunError that names the key (as `dataset.KEY`) and how to fix it.
"""
from __future__ import annotations

import os
from typing import Any, Mapping

from kdrun.config.groups import DATASET_RUNNER_KEYS, schema_defaults
from kdrun.errors import KdrunError
from kdrun.registry import did_you_mean


def read_options(dataset: str, cfg: Mapping[str, Any], schema: type) -> dict[str, Any]:
    """The schema's defaults overlaid with `cfg`; a key set to null keeps its default. Unknown keys are errors,
    because a misspelt key (dataset.augmnet=false) would otherwise be silently ignored."""
    defaults = schema_defaults(schema)
    unknown = sorted(set(cfg) - set(defaults) - {"name"} - set(DATASET_RUNNER_KEYS))
    if unknown:
        raise KdrunError(f"unknown key(s) {', '.join('dataset.' + k for k in unknown)} for dataset {dataset}; "
                         f"accepted keys: {', '.join(sorted(defaults))}{did_you_mean(unknown[0], defaults)}")
    options = dict(defaults)
    options.update({key: value for key, value in cfg.items() if value is not None and key in defaults})
    return options


def require_bool(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise KdrunError(f"dataset.{key}={value!r} must be true or false: pass dataset.{key}=true or dataset.{key}=false")
    return value


def require_int(key: str, value: Any, minimum: int) -> int:
    # bool is an int subclass; `true` is never a meaningful size.
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise KdrunError(f"dataset.{key}={value!r} must be an integer >= {minimum}: pass e.g. dataset.{key}={max(minimum, 1)}")
    return value


def require_fraction(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value < 1.0:
        raise KdrunError(f"dataset.{key}={value!r} must be a number strictly between 0 and 1: pass e.g. dataset.{key}=0.2")
    return float(value)


def require_channel_stats(key: str, value: Any, in_chans: int) -> tuple[float, ...]:
    """Per-channel mean or std: one positive-or-zero number per channel (std strictly positive)."""
    values = value if isinstance(value, (list, tuple)) else [value]
    ok = len(values) == in_chans and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and (v > 0 if key == "std" else True) for v in values)
    if not ok:
        example = ",".join(["0.5"] * in_chans)
        raise KdrunError(f"dataset.{key}={value!r} must list {in_chans} number(s), one per channel"
                         f"{' (all > 0)' if key == 'std' else ''}, to match dataset.in_chans={in_chans}: "
                         f"pass e.g. dataset.{key}=[{example}]")
    return tuple(float(v) for v in values)


def absolute_path(path: Any) -> str:
    """An absolute path; a relative one is taken from where kdrun was launched (Hydra's original cwd),
    so error messages and lookups agree even if a run changes directory."""
    from hydra.utils import to_absolute_path

    return os.path.abspath(to_absolute_path(os.path.expanduser(str(path))))


# Keys that dataset configs gained after stage-cache entries had been written, and the value at which each
# leaves the data as it was: a stage's key leaves them out at that value, so those entries still match.
NEUTRAL_KEYS = {"val_split": 0.0, "pack": False}
# Keys that change where files live or how fast they are read, never what a model is trained on.
PLACEMENT_KEYS = ("pack_dir",)


def cache_key_options(dataset: Mapping[str, Any]) -> dict[str, Any]:
    """The dataset config as a stage-cache key reads it (kdrun.stages.roles, kdrun.engine.teacher_cache)."""
    options = {k: v for k, v in dataset.items() if k not in PLACEMENT_KEYS}
    for key, neutral in NEUTRAL_KEYS.items():
        if key in options and options[key] == neutral:
            del options[key]
    if "val_split" not in options:
        options.pop("val_split_seed", None)  # no holdout: its seed draws nothing
    return options

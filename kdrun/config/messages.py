"""One-line messages for compose-time errors: unknown keys under the typed schemas, unknown group options.

OmegaConf says `Key 'augmnet' not in 'EmbeddedDataset'`; this says `unknown key dataset.augmnet for dataset
mnist5k: accepted keys are name, split_seed, test_fraction; did you mean ...?`. Hydra answers an option no
config dir holds (`hydra/launcher=nope`, checked by Hydra alone) over many lines; this says `unknown
hydra/launcher 'nope': choose one of basic, joblib, ...`. Pure Python (no torch).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

from hydra.errors import MissingConfigException
from omegaconf.errors import ConfigAttributeError, ConfigKeyError

from kdrun.config.groups import schema_keys
from kdrun.registry import did_you_mean, unknown_name


def compose_error_line(error: BaseException) -> Optional[str]:
    """The one line for an unknown key under a typed group (`dataset.augmnet=false`) or an unknown option of a
    group (`hydra/launcher=nope`), or None for any other error (the caller keeps Hydra's own first line)."""
    missing = missing_option_line(error)
    if missing:
        return missing
    cause = error.__cause__ or error.__context__
    if not isinstance(cause, (ConfigAttributeError, ConfigKeyError)):
        return None
    schema, full_key = getattr(cause, "object_type", None), getattr(cause, "full_key", None)
    if schema is None or not dataclasses.is_dataclass(schema) or not full_key:
        return None
    if "." not in str(full_key):
        return None  # a top-level key: OmegaConf's `Key 'epoch' not in 'KdrunConfig'` says it already
    group, key = str(full_key).rsplit(".", 1)
    accepted = schema_keys(schema)  # what `GROUP.KEY=VALUE` can set (`+dataset.num_workers=N` adds a runner key)
    try:
        name = cause.parent_node.get("name")
    except Exception:  # no parent, or its name is missing: the group alone names it well enough
        name = None
    owner = f"{group} {name}" if isinstance(name, str) else group
    return f"unknown key {full_key} for {owner}: accepted keys are {', '.join(sorted(accepted))}{did_you_mean(key, accepted)}"


def missing_option_line(error: BaseException) -> Optional[str]:
    """`unknown hydra/launcher 'nope': choose one of basic, joblib, ...` for an option Hydra found in no config
    dir (kdrun's own groups are checked before Hydra runs: kdrun.cli.argv)."""
    if not isinstance(error, MissingConfigException) or not error.options or not error.missing_cfg_file:
        return None
    group, _, name = str(error.missing_cfg_file).rpartition("/")
    if not group:
        return None
    return unknown_name(group, name, sorted(error.options), f"{group}=NAME")

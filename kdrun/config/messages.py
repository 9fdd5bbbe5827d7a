"""One-line messages for compose-time errors that the typed schemas raise, naming the accepted keys.

OmegaConf says `Key 'augmnet' not in 'EmbeddedDataset'`; this says `unknown key dataset.augmnet for dataset
mnist5k: accepted keys are name, split_seed, test_fraction; did you mean ...?`. Pure Python (no torch).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

from omegaconf.errors import ConfigAttributeError, ConfigKeyError

from kdrun.config.groups import schema_keys
from kdrun.registry import did_you_mean


def compose_error_line(error: BaseException) -> Optional[str]:
    """The one line for an unknown key under a typed group (`dataset.augmnet=false`), or None for any other
    error (the caller keeps Hydra's own first line)."""
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

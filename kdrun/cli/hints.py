"""Hydra's and OmegaConf's compose errors as one line that keeps their hint.

Hydra explains over several lines (`Ambiguous value ...` then "add --multirun"); the CLI prints one
line, so the hint must move into it, with the user's own key and value filled in, rather than be cut.
Light imports only: these errors are answered before torch loads.
"""
from __future__ import annotations

import re
import shlex
from typing import Optional

from hydra.errors import MissingConfigException, OverrideParseException
from omegaconf.errors import ConfigAttributeError, ConfigKeyError

from kdrun.config.messages import compose_error_line
from kdrun.paths import config_groups
from kdrun.registry import did_you_mean

GRAMMAR_DOCS = "https://hydra.cc/docs/advanced/override_grammar/basic/"
_AMBIGUOUS = re.compile(r"Ambiguous value for argument '(.*)'")
_SWEEP_NEEDS_MULTIRUN = re.compile(r"Sweep parameters '(.*)' requires --multirun")
_ALREADY_THERE = re.compile(r"Could not append to config\. An item is already at '(.*)'")


def hydra_error_line(error: BaseException) -> str:
    """The one line for a Hydra/OmegaConf error raised while composing (or resolving) the config."""
    for explain in (compose_error_line, _unreadable, _several_values, _unknown_key, _missing_option):
        line = explain(error)
        if line:
            return line
    parts = [_first_line(error)]
    full_key = getattr(error, "full_key", None)
    if full_key and str(full_key) not in parts[0]:  # OmegaConf's resolver errors do not say which key
        parts.insert(0, str(full_key))
    cause = error.__cause__
    if cause is not None and str(cause).strip():
        parts.append(_first_line(cause))
    return ": ".join(parts)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


# ---- a value Hydra's grammar cannot read -----------------------------------------------------------

def _unreadable(error: BaseException) -> Optional[str]:
    if not isinstance(error, OverrideParseException):
        return None
    override = str(error.override)
    reason = next((line.strip() for line in str(error).splitlines()
                   if line.strip() and not line.startswith(("Error parsing override", "See https://"))), "")
    if "=" not in override:
        return (f"'{override}' is not an override: write KEY=VALUE (e.g. T=3); a value with spaces is quoted "
                f"whole, e.g. kdrun 'dataset.root=/my data' (kdrun --help lists the keys)")
    key, value = override.split("=", 1)
    quoted = quoted_override(key, value)
    if quoted is None:
        return f"Hydra cannot read the override '{override}' ({reason}); see {GRAMMAR_DOCS}"
    return (f"Hydra cannot read the value of '{override}' ({reason}): quote it, "
            f"e.g. kdrun {shell_quoted(quoted)} (see {GRAMMAR_DOCS})")


def quoted_override(key: str, value: str) -> Optional[str]:
    """`key="value"` as Hydra's grammar reads it back to exactly `value`, or None when no quoting does."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    for quote in ('"', "'"):
        # Inside quotes Hydra takes a backslash literally, except before a quote: double those, escape the quote.
        body = re.sub(r"(\\+)(?=" + quote + r"|$)", lambda m: m.group(1) * 2, value).replace(quote, "\\" + quote)
        candidate = f"{key}={quote}{body}{quote}"
        try:
            if parser.parse_override(candidate).value() == value:
                return candidate
        except Exception:  # this quote char does not work for this value: try the other
            continue
    return None


def shell_quoted(arg: str) -> str:
    """`arg` as one word for a POSIX shell, in the most readable quotes that keep it intact."""
    if "'" in arg and not any(char in arg for char in '"$`\\!'):
        return f'"{arg}"'
    return shlex.quote(arg)


# ---- several values without -m ----------------------------------------------------------------------

def _several_values(error: BaseException) -> Optional[str]:
    text = str(error)
    found = _AMBIGUOUS.search(text)
    if found:
        override = found.group(1)
        key, value = override.split("=", 1)
        sweep = (f"{override} gives {key.lstrip('+~')} several values: to sweep over them add -m/--multirun "
                 f"(kdrun -m {shell_quoted(override)})")
        if "/" in key or key.lstrip("+~") in config_groups():  # options of a group: a sweep is all it can mean
            return sweep
        as_string = quoted_override(key, value)
        string_hint = f", or quote it for one string: {shell_quoted(as_string)}" if as_string else ""
        return f"{sweep}; for a list write {key}=[{value}]{string_hint}"
    found = _SWEEP_NEEDS_MULTIRUN.search(text)
    if found:
        override = found.group(1)
        return f"{override} is a sweep: add -m/--multirun (kdrun -m {shell_quoted(override)})"
    found = _ALREADY_THERE.search(text)
    if found:  # `+T=3`: '+' adds a key that is not in the config yet
        key = found.group(1)
        return f"{key} is already in the config: set it without the '+' ({key}=VALUE)"
    return None


# ---- a misspelt key or option ----------------------------------------------------------------------

def _unknown_key(error: BaseException) -> Optional[str]:
    """`Alpha=0.5`: Hydra suggests `+Alpha=0.5`, which adds a key nothing reads; name the close key instead."""
    cause = error.__cause__ or error.__context__
    if not isinstance(cause, (ConfigAttributeError, ConfigKeyError)) or not getattr(cause, "full_key", None):
        return None
    full_key, key = str(cause.full_key), str(getattr(cause, "key", "") or cause.full_key)
    try:
        known = [str(k) for k in cause.parent_node.keys() if str(k) != "hydra"]
    except Exception:  # no parent node to list: OmegaConf's own line says enough
        return None
    owner = full_key.rsplit(".", 1)[0] if "." in full_key else "kdrun's config"
    hint = did_you_mean(key, known) or "; kdrun --help lists the keys and config groups"
    return f"Could not override '{full_key}': Key '{key}' not in {owner}{hint}"


def _missing_option(error: BaseException) -> Optional[str]:
    """`hydra/launcher=jobli`: Hydra lists the available options over many lines."""
    if not isinstance(error, MissingConfigException) or not error.options:
        return None
    missing = str(error.missing_cfg_file or "")
    group, _, name = missing.rpartition("/")
    options = sorted(str(option) for option in error.options)
    return f"unknown option '{name}' of {group}: choose one of {', '.join(options)}{did_you_mean(name, options)}"


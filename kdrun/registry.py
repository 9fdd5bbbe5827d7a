"""Registries: the single source of the names a user types (loss terms, datasets, model sources, paradigms).

In the manner of timm's `register_model`, each entry registers itself where it is defined:

    TERMS = Registry("loss term type", "distill.terms.<name>.type")

    @TERMS.register("kd", family="response")
    class KDTerm(nn.Module): ...

Dispatch, "did you mean ...?" suggestions and the checks after import read the names from here, and a test
(tests/test_registries.py) checks that every config file in conf/ names a registered entry and every entry
has its file. The checks that run before torch loads (the CLI answers bad input in well under a second) read
the same names from the conf/ groups instead, which that test keeps equal to the registries.

Pure Python: no torch here. The registries themselves live next to what they register (kdrun.distill,
kdrun.data, kdrun.models.factory), whose modules load torch.
"""
from __future__ import annotations

import difflib
from collections.abc import Mapping
from typing import Any, Callable, Iterable, Iterator, Optional

from kdrun.errors import KdrunError


def did_you_mean(name: str, choices: Iterable[str], n: int = 1, cutoff: float = 0.6) -> str:
    """`; did you mean 'x'?` for the closest of `choices` (ignoring case), or an empty string."""
    by_lower = {str(choice).lower(): str(choice) for choice in sorted(choices)}
    close = difflib.get_close_matches(str(name).lower(), list(by_lower), n=n, cutoff=cutoff)
    if not close:
        return ""
    return f"; did you mean {' or '.join(repr(by_lower[c]) for c in close)}?"


def unknown_name(kind: str, name: str, choices: Iterable[str], key: str = "", where: Optional[str] = None) -> str:
    """The one line for a name that is not among `choices`:
    `unknown dataset 'cifar11': choose one of cifar10, ... (dataset=NAME); did you mean 'cifar10'?`"""
    choices = sorted(choices)
    place = f" in {where}" if where else ""
    how = f" ({key})" if key else ""
    return f"unknown {kind} '{name}'{place}: choose one of {', '.join(choices)}{how}{did_you_mean(name, choices)}"


class Registry(Mapping):
    """Names -> objects, with the metadata each entry declares (e.g. its family, or its config schema).

    A read-only mapping for callers (`name in TERMS`, `TERMS[name]`, `TERMS.items()`); entries are added with
    `register` (a decorator) or `add`, and `del REGISTRY[name]` removes one (for tests that register a toy).
    """

    def __init__(self, kind: str, key: str):
        self.kind = kind          # "loss term type", "dataset", ...: how errors name an entry
        self.key = key            # where a user types the name, e.g. "dataset=NAME"
        self._entries: dict[str, Any] = {}
        self._info: dict[str, dict] = {}

    def register(self, name: str, **info: Any) -> Callable[[Any], Any]:
        """Decorator: `@REGISTRY.register("name", **info)` above a class or function."""
        def add(obj: Any) -> Any:
            self.add(name, obj, **info)
            return obj
        return add

    def add(self, name: str, obj: Any, **info: Any) -> None:
        if name in self._entries and self._entries[name] is not obj:
            raise ValueError(f"{self.kind} '{name}' is registered twice")
        self._entries[name] = obj
        self._info[name] = info

    def names(self) -> list[str]:
        return sorted(self._entries)

    def info(self, name: str) -> dict:
        return dict(self._info[name])

    def get(self, name: str, where: Optional[str] = None) -> Any:  # type: ignore[override]
        """The entry called `name`, or one line naming the choices and the closest one."""
        if name not in self._entries:
            raise KdrunError(self.unknown(name, where))
        return self._entries[name]

    def unknown(self, name: str, where: Optional[str] = None) -> str:
        return unknown_name(self.kind, name, self._entries, self.key, where)

    def view(self, **info: Any) -> "RegistryView":
        """The entries whose metadata has these values, e.g. TERMS.view(family="feature"), kept up to date."""
        return RegistryView(self, info)

    # Mapping: registration order; names() is sorted.
    def __getitem__(self, name: str) -> Any:
        return self._entries[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __setitem__(self, name: str, obj: Any) -> None:  # what monkeypatch.setitem does: same rules as add()
        self.add(name, obj, **self._info.get(name, {}))

    def __delitem__(self, name: str) -> None:
        del self._entries[name]
        del self._info[name]

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}: {', '.join(self.names())})"


class RegistryView(Mapping):
    """A live, read-only selection of a registry's entries by their metadata."""

    def __init__(self, registry: Registry, info: dict):
        self._registry, self._wanted = registry, info

    def _selected(self) -> list[str]:
        return [name for name in self._registry
                if all(self._registry.info(name).get(k) == v for k, v in self._wanted.items())]

    def __getitem__(self, name: str) -> Any:
        if name not in self._selected():
            raise KeyError(name)
        return self._registry[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._selected())

    def __len__(self) -> int:
        return len(self._selected())

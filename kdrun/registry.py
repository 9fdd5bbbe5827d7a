"""Registries: the single source of the names a user types (loss terms, datasets, model sources, paradigms).

In the manner of timm's `register_model`, each entry registers itself where it is defined:

    TERMS = Registry("loss term", "distill.terms.<name>.type")

    @TERMS.register("kd")
    class KDTerm(nn.Module): ...

Help text, "did you mean ...?" suggestions and argument checks read the names from here, and a test
checks that every config file in conf/ names a registered entry and every entry has its file.
Pure Python: no torch here, so the CLI's early checks can use it.
"""
from __future__ import annotations

import difflib
from typing import Any, Callable, Iterable, Optional

from kdrun.errors import KdrunError


def did_you_mean(name: str, choices: Iterable[str], n: int = 1, cutoff: float = 0.6) -> str:
    """`; did you mean 'x'?` for the closest of `choices`, or an empty string."""
    close = difflib.get_close_matches(str(name).lower(), sorted(choices), n=n, cutoff=cutoff)
    if not close:
        return ""
    return f"; did you mean {' or '.join(repr(c) for c in close)}?"


class Registry:
    """Names -> objects, with the metadata each entry declares (e.g. which conf/ file it needs)."""

    def __init__(self, kind: str, key: str):
        self.kind = kind          # "loss term", "dataset", ...: how errors name an entry
        self.key = key            # where a user types the name, e.g. "dataset=NAME"
        self._entries: dict[str, Any] = {}
        self._info: dict[str, dict] = {}

    def register(self, name: str, **info: Any) -> Callable[[Any], Any]:
        """Decorator: `@REGISTRY.register("name")` above a class or function."""
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

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def get(self, name: str, where: Optional[str] = None) -> Any:
        """The entry called `name`, or one line naming the choices and the closest one."""
        if name not in self._entries:
            raise KdrunError(self.unknown(name, where))
        return self._entries[name]

    def unknown(self, name: str, where: Optional[str] = None) -> str:
        place = f" in {where}" if where else ""
        return (f"unknown {self.kind} '{name}'{place}: choose one of {', '.join(self.names())} "
                f"({self.key}){did_you_mean(name, self._entries)}")

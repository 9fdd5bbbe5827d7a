"""The models of a run waiting to be timed, and the metrics dicts their speed figures go into.

A model's params and FLOPs are known when it is evaluated; its latency and throughput are filled in
once the run has evaluated all of its models, so that they can be timed together (kdrun.evaluation.cost).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Hashable, Iterable, Union

import torch
from torch import nn

from kdrun.evaluation.cost import combine_costs, time_models

Setup = tuple[tuple[int, ...], int, torch.device]   # input shape of one image, batch size, device


@dataclass
class _Entry:
    source: Union[Hashable, list]    # a model's key, or the member dicts of a combined cost
    targets: list[dict] = field(default_factory=list)   # the dicts that get the figures


class Untimed:
    """Models waiting to be timed (one per key) and, per model or combination, the dicts to fill in."""

    def __init__(self) -> None:
        self._models: dict[Hashable, tuple[nn.Module, Setup]] = {}
        self._entries: list[_Entry] = []

    def add(self, key: Hashable, model: nn.Module, setup: Setup, cost: dict) -> None:
        """`cost` gets the speed figures of `key` (one model stands for every model of that key)."""
        self._models.setdefault(key, (model, setup))
        self._entries.append(_Entry(key, [cost]))

    def combine(self, members: list[dict], cost: dict) -> None:
        """`cost` gets the combined figures of `members` (models' metrics), once those are timed."""
        self._entries.append(_Entry(list(members), [cost]))

    def follow(self, target: dict, cost: dict) -> None:
        """`target` (which copied `cost`'s keys) gets the figures `cost` gets."""
        for entry in self._entries:
            if any(t is cost for t in entry.targets):
                entry.targets.append(target)

    def settle(self, reachable: Iterable[dict]) -> dict[Hashable, dict]:
        """Time together the models behind the `reachable` dicts, fill those in, and forget everything
        waiting (what no reachable dict needs belongs to nothing that is reported). Returns each timed
        key's figures."""
        needed = self._needed({id(d) for d in reachable})
        keys = {e.source for e in needed if not isinstance(e.source, list)}
        figures: dict[Hashable, dict] = {}
        by_setup: dict[Setup, dict[Hashable, nn.Module]] = {}
        for key in keys:
            model, setup = self._models[key]
            by_setup.setdefault(setup, {})[key] = model
        for setup, models in by_setup.items():  # one setup in a run: its dataset, batch size and device
            figures.update(time_models(models, *setup))
        for entry in needed:  # in the order added: members before what combines them
            values = combine_costs(entry.source) if isinstance(entry.source, list) else figures[entry.source]
            for target in entry.targets:
                target.update(values)
        self._models, self._entries = {}, []
        return figures

    def _needed(self, reachable: set[int]) -> list[_Entry]:
        wanted = {i for i, e in enumerate(self._entries) if any(id(t) in reachable for t in e.targets)}
        pending = list(wanted)
        while pending:  # a combined cost needs its members' entries
            source = self._entries[pending.pop()].source
            if isinstance(source, list):
                member_ids = {id(m) for m in source}
                for i, e in enumerate(self._entries):
                    if i not in wanted and any(id(t) in member_ids for t in e.targets):
                        wanted.add(i)
                        pending.append(i)
        return [e for i, e in enumerate(self._entries) if i in wanted]

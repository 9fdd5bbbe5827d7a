"""The stage cache: teacher and baseline checkpoints keyed by a hash of the config that determines them.

outputs/cache/<stage>/<key>/model.pt is written once, atomically, while holding
outputs/cache/<stage>/<key>.lock, so parallel sweep jobs train a stage once and the others reuse it.
An unfinished build keeps its progress in <key>/last.pt and the next attempt resumes from it.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock

# Bump when a change to training makes old cached stages invalid.
CACHE_VERSION = 1


def stage_key(spec: dict[str, Any]) -> str:
    payload = json.dumps({"cache_version": CACHE_VERSION, **spec}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


@dataclass
class CacheEntry:
    root: Path
    stage: str
    key: str

    @property
    def directory(self) -> Path:
        return self.root / self.stage / self.key

    @property
    def model_path(self) -> Path:
        return self.directory / "model.pt"

    def exists(self) -> bool:
        return self.model_path.is_file()

    def lock(self) -> FileLock:
        self.directory.parent.mkdir(parents=True, exist_ok=True)
        return FileLock(str(self.directory) + ".lock")

    def write_spec(self, spec: dict[str, Any]) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        (self.directory / "spec.json").write_text(json.dumps(spec, indent=2, sort_keys=True, default=str))

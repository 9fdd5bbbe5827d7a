"""The stage cache: teacher and baseline checkpoints keyed by a hash of the config that determines them.

outputs/cache/<stage>/<key>/model.pt is written once, atomically, while holding
outputs/cache/<stage>/<key>.lock, so parallel sweep jobs train a stage once and the others reuse it.
An entry is complete exactly when model.pt is a whole file: a directory without one is rebuilt, and
an unfinished build keeps its progress in <key>/last.pt so the next attempt resumes from it.

The lock is filelock's FileLock, an flock() on Linux and macOS: the kernel releases it when its
holder dies, even by SIGKILL, so a crashed job never leaves a stale lock behind (tested). The .lock
file itself stays; it is the lock's name, not its state. flock() needs a local filesystem or one
that supports it across hosts (NFSv4, Lustre, GPFS do).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock

log = logging.getLogger("kdrun")

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

    def complete(self) -> bool:
        """Whether model.pt is a whole file. One that is not (torn by a copy, a full disk, a crash of the
        machine) is moved aside to model.pt.corrupt so the stage is rebuilt; torch.save writes a zip,
        whose directory sits at the end: a truncated file has none."""
        if not self.exists():
            return False
        if zipfile.is_zipfile(self.model_path):
            return True
        corrupt = self.model_path.with_name("model.pt.corrupt")
        os.replace(self.model_path, corrupt)
        log.warning("%s cache: %s is not a whole checkpoint; moved it to %s and rebuilding the stage",
                    self.stage, self.model_path, corrupt.name)
        return False

    def lock(self) -> FileLock:
        self.directory.parent.mkdir(parents=True, exist_ok=True)
        return FileLock(str(self.directory) + ".lock")

    def write_spec(self, spec: dict[str, Any]) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / "spec.json"
        tmp = path.with_name(f".spec.json.tmp{os.getpid()}")
        tmp.write_text(json.dumps(spec, indent=2, sort_keys=True, default=str))
        os.replace(tmp, path)

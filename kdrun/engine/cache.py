"""The stage cache: teacher and baseline checkpoints keyed by a hash of the config that determines them.

A finished entry, outputs/cache/<stage>/<key>/, holds what reuse needs and nothing else:

    model.pt    the final weights, with the per-epoch history (what a later run loads)
    best.pt     the best epoch's weights, only when that is not the last epoch (paradigm=teacher and
                paradigm=baseline copy it into the run's checkpoints/; otherwise model.pt is the best)
    spec.json   the config the key hashes, and the sha256 of each file above
    tb/         the stage's TensorBoard curves

A stage is built in <key>.partial/, where last.pt and last.prev.pt let an interrupted build resume; when
it ends, the resume state is dropped and the directory renamed to <key>/ at once, so an entry without
its model.pt never exists. On reuse every file is checked against its recorded sha256: an entry that
fails (a flipped bit, a torn copy, no checksum at all) is moved aside to <key>.corrupt/ with one
warning and the stage is rebuilt.

Every build holds outputs/cache/<stage>/<key>.lock, filelock's FileLock, an flock() on Linux and
macOS: parallel sweep jobs train a stage once and the others wait and reuse it, and the kernel
releases the lock when its holder dies, even by SIGKILL, so a crashed job never leaves a stale lock
behind (tested). The .lock file itself stays; it is the lock's name, not its state. flock() needs a
local filesystem or one that supports it across hosts (NFSv4, Lustre, GPFS do).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from filelock import FileLock

from kdrun.run_files import LAST_CHECKPOINT, PREVIOUS_CHECKPOINT, has_checkpoint

log = logging.getLogger("kdrun")

# Bump when a change to training makes old cached stages invalid.
CACHE_VERSION = 1
MODEL, BEST, SPEC = "model.pt", "best.pt", "spec.json"
CHECKSUMS = "sha256"   # spec.json's key: file name -> its sha256


def stage_key(spec: dict[str, Any]) -> str:
    payload = json.dumps({"cache_version": CACHE_VERSION, **spec}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def checksums(directory: Path, names: list[str]) -> dict[str, str]:
    return {name: file_sha256(directory / name) for name in names}


def verify_checksums(directory: Path, recorded: Any) -> Optional[str]:
    """Why the files of `directory` do not match `recorded` (name -> sha256), or None when they all do."""
    if not isinstance(recorded, dict) or not recorded:
        return "no checksums recorded (written by an earlier kdrun)"
    for name, expected in sorted(recorded.items()):
        path = directory / name
        if not path.is_file():
            return f"{name} is missing"
        if file_sha256(path) != expected:
            return f"{name} does not match its recorded sha256"
    return None


def move_aside(directory: Path) -> Path:
    """Rename a bad entry to <key>.corrupt (replacing an older one), out of the way of its rebuild."""
    corrupt = directory.with_name(directory.name + ".corrupt")
    shutil.rmtree(corrupt, ignore_errors=True)
    os.replace(directory, corrupt)
    return corrupt


def _write_json(data: dict, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str))
    os.replace(tmp, path)


@dataclass
class CacheEntry:
    root: Path
    stage: str
    key: str

    @property
    def directory(self) -> Path:
        return self.root / self.stage / self.key

    @property
    def build_directory(self) -> Path:
        """Where the stage trains (and resumes) until the entry is complete."""
        return self.root / self.stage / f"{self.key}.partial"

    @property
    def model_path(self) -> Path:
        return self.directory / MODEL

    def complete(self) -> bool:
        """Whether a finished entry is here and every file matches its recorded sha256. One that does not is
        moved aside to <key>.corrupt with a warning, and the caller rebuilds the stage (an earlier kdrun's
        unfinished build, progress in <key>/ without model.pt, becomes <key>.partial and is resumed)."""
        if not self.directory.exists():
            return False
        if not self.model_path.is_file() and has_checkpoint(self.directory) and not self.build_directory.exists():
            os.replace(self.directory, self.build_directory)  # an earlier kdrun's unfinished build: resumed
            return False
        problem = f"no {MODEL}" if not self.model_path.is_file() else verify_checksums(self.directory,
                                                                                      self._recorded())
        if problem is None:
            return True
        corrupt = move_aside(self.directory)
        log.warning("%s cache: %s failed verification (%s); moved it to %s and rebuilding the stage",
                    self.stage, self.directory, problem, corrupt.name)
        return False

    def _recorded(self) -> Any:
        try:
            return json.loads((self.directory / SPEC).read_text()).get(CHECKSUMS)
        except (OSError, ValueError, AttributeError):
            return None

    def lock(self) -> FileLock:
        self.directory.parent.mkdir(parents=True, exist_ok=True)
        return FileLock(str(self.directory) + ".lock")

    def start_build(self, spec: dict[str, Any]) -> None:
        """The build directory, with the spec (an interrupted build's progress in it is kept)."""
        self.build_directory.mkdir(parents=True, exist_ok=True)
        _write_json(spec, self.build_directory / SPEC)

    def finish_build(self, spec: dict[str, Any], keep_best: bool) -> None:
        """Drop the resume state (and best.pt unless asked to keep it), record each file's sha256 in spec.json,
        and rename the build directory to the entry. model.pt must already be in the build directory."""
        build = self.build_directory
        dropped = [LAST_CHECKPOINT, PREVIOUS_CHECKPOINT, *([] if keep_best else [BEST])]
        for name in dropped:
            (build / name).unlink(missing_ok=True)
        kept = [name for name in (MODEL, BEST) if (build / name).is_file()]
        _write_json({**spec, CHECKSUMS: checksums(build, kept)}, build / SPEC)
        os.replace(build, self.directory)  # the whole entry appears at once

    def abandon_build(self) -> None:
        """After a failed build: remove its directory unless it holds progress to resume from."""
        if self.build_directory.is_dir() and not has_checkpoint(self.build_directory):
            shutil.rmtree(self.build_directory, ignore_errors=True)

"""Teacher-output cache (`teacher.cache=true`): the frozen teacher runs once over the training set.

Its logits (and, for feature and relation methods, its matched feature maps and embedding) are
stored as float16 `.npy` files under outputs/cache/teacher_outputs/<key>/ and memory-mapped; a
training step reads the rows of its sample indices instead of running the teacher. The key hashes
the teacher's weights, the dataset config and its training transform, the feature taps and the
precision, so any change computes a new entry. An entry is written into a hidden temporary folder
and renamed into place whole (under the stage cache's file lock), so no reader ever sees half of one.
The manifest records each array's sha256, checked on every reuse (about a second per GB): an entry that
does not match is moved aside to <key>.corrupt with one warning and computed again.

Valid only when the training images are the same every epoch: a dataset with random augmentation
is refused with a one-line error (augmentation is not replayed from stored parameters).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from kdrun.data import InMemoryDataset
from kdrun.engine import distributed
from kdrun.engine.cache import CHECKSUMS, CacheEntry, checksums, move_aside, stage_key, verify_checksums
from kdrun.engine.forward import FeaturePairing
from kdrun.engine.loaders import Batches
from kdrun.engine.speed import Speed
from kdrun.errors import KdrunError

log = logging.getLogger("kdrun")

CACHE_STAGE = "teacher_outputs"
MANIFEST = "manifest.json"
STORED_DTYPE = np.float16


@dataclass
class TeacherOutputs:
    """The cached outputs of every training sample, looked up by sample index."""
    logits: torch.Tensor                        # (N, K) float16
    features: Optional[list[torch.Tensor]]      # matched teacher maps, each (N, C, H, W) float16
    embedding: Optional[torch.Tensor]           # (N, D) float16
    directory: Path
    reused: bool                                # True when an earlier run had computed it

    def __len__(self) -> int:
        return len(self.logits)

    def logits_for(self, indices: torch.Tensor) -> torch.Tensor:
        return _rows(self.logits, indices)

    def features_for(self, indices: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
        if self.features is None or self.embedding is None:
            raise KdrunError(f"the teacher-output cache in {self.directory} holds logits only but the method needs "
                             "features: pass teacher.cache=false")
        return (_rows(self.logits, indices), [_rows(m, indices) for m in self.features],
                _rows(self.embedding, indices))


def _rows(table: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Rows of a float16 table as float32 on the indices' device (what a live fp32 teacher returns)."""
    if table.device == indices.device:
        return table[indices].float()
    return table[indices.cpu()].to(indices.device, non_blocking=True).float()


def check_cacheable(train_set: Dataset, dataset_name: str, option: str = "teacher.cache=true",
                    fix: str = "teacher.cache=false") -> None:
    """The one-line refusal for random training transforms, raised before any stage trains (stored teacher
    outputs too: one answer per training image)."""
    if isinstance(train_set, InMemoryDataset):
        random_step = train_set.augment
    else:
        transform = getattr(getattr(train_set, "base", train_set), "transform", None)
        steps = getattr(transform, "transforms", [transform] if transform is not None else [])
        random_step = next((t for t in steps if type(t).__name__.startswith("Random")), None)
    if random_step is not None:
        raise KdrunError(f"{option} needs the same training images every epoch, but dataset {dataset_name} "
                         f"augments them at random ({random_step!r}): pass dataset.augment=false, or {fix}")


def weights_digest(model: nn.Module) -> str:
    """A hash of every parameter and buffer: the teacher's identity, however it was obtained."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(str(tensor.dtype).encode())
        data = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return digest.hexdigest()[:32]


def describe_transform(train_set: Dataset) -> Any:
    if isinstance(train_set, InMemoryDataset):
        return {"mean": train_set.mean, "std": train_set.std, "augment": repr(train_set.augment),
                "shape": list(train_set.images.shape)}
    return repr(getattr(getattr(train_set, "base", train_set), "transform", None))


def cache_spec(teacher_name: str, teacher: nn.Module, dataset_cfg: dict, train_set: Dataset,
               pairing: Optional[FeaturePairing], speed: Speed) -> dict:
    features = None
    if pairing is not None:
        features = [pairing.teacher.names[i] for i in pairing.teacher_index]
    return {"stage": CACHE_STAGE, "teacher": {"name": teacher_name, "weights": weights_digest(teacher)},
            "dataset": dataset_cfg, "size": len(train_set), "transform": describe_transform(train_set),
            "features": features, "precision": speed.precision}


def load_or_build(cache_root: Path, spec: dict, teacher: nn.Module, pairing: Optional[FeaturePairing],
                  train_set: Dataset, batch_size: int, device: torch.device, speed: Speed,
                  max_mb: float) -> TeacherOutputs:
    """The cache entry for `spec`, computed first if no earlier run did (rank 0 computes, others wait)."""
    entry = CacheEntry(Path(cache_root), CACHE_STAGE, stage_key(spec))
    with distributed.rank_zero_lock(entry.lock):  # parallel sweep jobs: one computes, the others wait and reuse
        reused = distributed.from_rank_zero(_complete(entry.directory) if distributed.is_main() else None)
        if not reused and distributed.is_main():
            _build(entry, spec, teacher, pairing, train_set, batch_size, device, speed, max_mb)
        distributed.barrier()
    return open_outputs(entry.directory, device, reused)


def _complete(directory: Path) -> bool:
    """Whether the entry is here and each array matches the sha256 in its manifest. One that does not is moved
    aside to <key>.corrupt with a warning, and the caller computes it again."""
    if not directory.exists():
        return False
    try:
        recorded = json.loads((directory / MANIFEST).read_text()).get(CHECKSUMS)
    except (OSError, ValueError, AttributeError):
        recorded = None
    problem = verify_checksums(directory, recorded)
    if problem is None:
        return True
    corrupt = move_aside(directory)
    log.warning("teacher outputs: %s failed verification (%s); moved it to %s and computing them again",
                directory, problem, corrupt.name)
    return False


def _build(entry: CacheEntry, spec: dict, teacher: nn.Module, pairing: Optional[FeaturePairing],
           train_set: Dataset, batch_size: int, device: torch.device, speed: Speed, max_mb: float) -> None:
    parent = entry.directory.parent
    for stale in parent.glob(f".{entry.key}.tmp*"):  # left by a killed build; we hold the lock
        shutil.rmtree(stale, ignore_errors=True)
    tmp = parent / f".{entry.key}.tmp{os.getpid()}"
    tmp.mkdir(parents=True)
    try:
        arrays: dict[str, np.ndarray] = {}
        teacher.eval()
        with torch.no_grad(), speed.autocast():
            for images, _, indices in Batches(train_set, batch_size, device, shuffle=False):
                outputs = _teacher_outputs(teacher, pairing, speed.inputs(images))
                if not arrays:
                    arrays = _allocate(tmp, outputs, len(train_set), max_mb)
                rows = indices.cpu().numpy()
                for name, value in outputs.items():
                    arrays[name][rows] = value.float().cpu().numpy().astype(STORED_DTYPE)
        for array in arrays.values():
            array.flush()
        manifest = {"spec": spec, "arrays": {name: list(a.shape) for name, a in arrays.items()},
                    "dtype": np.dtype(STORED_DTYPE).name}
        del arrays
        manifest[CHECKSUMS] = checksums(tmp, [f"{name}.npy" for name in manifest["arrays"]])
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str))
        os.replace(tmp, entry.directory)  # the whole entry appears at once
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _teacher_outputs(teacher: nn.Module, pairing: Optional[FeaturePairing],
                     images: torch.Tensor) -> dict[str, torch.Tensor]:
    if pairing is None:
        return {"logits": teacher(images)}
    logits, maps, embedding = pairing.teacher(images)
    outputs = {"logits": logits, "embedding": embedding}
    outputs.update({f"features_{k}": maps[i] for k, i in enumerate(pairing.teacher_index)})
    return outputs


def _allocate(directory: Path, first: dict[str, torch.Tensor], count: int, max_mb: float) -> dict[str, np.ndarray]:
    itemsize = np.dtype(STORED_DTYPE).itemsize
    shapes = {name: (count, *value.shape[1:]) for name, value in first.items()}
    needed_mb = sum(int(np.prod(shape)) for shape in shapes.values()) * itemsize / 2**20
    if needed_mb > max_mb:
        what = "logits" if len(shapes) == 1 else "logits and features"
        raise KdrunError(f"teacher.cache=true: the teacher's {what} for {count} images need {needed_mb:.0f} MB, over "
                         f"teacher.cache_max_mb={max_mb:g}: raise teacher.cache_max_mb or pass teacher.cache=false")
    return {name: np.lib.format.open_memmap(directory / f"{name}.npy", mode="w+", dtype=STORED_DTYPE, shape=shape)
            for name, shape in shapes.items()}


def open_outputs(directory: Path, device: torch.device, reused: bool) -> TeacherOutputs:
    manifest = json.loads((directory / MANIFEST).read_text())
    tables = {name: _memory_map(directory / f"{name}.npy") for name in manifest["arrays"]}
    if device.type == "cuda":
        # Logits and embeddings are small: keep them on the GPU so a lookup never syncs.
        for name in ("logits", "embedding"):
            if name in tables:
                tables[name] = tables[name].to(device)
    feature_names = sorted((n for n in tables if n.startswith("features_")), key=lambda n: int(n.split("_")[1]))
    return TeacherOutputs(tables["logits"], [tables[n] for n in feature_names] if feature_names else None,
                          tables.get("embedding"), directory, reused)


def _memory_map(path: Path) -> torch.Tensor:
    array = np.load(path, mmap_mode="r")
    with warnings.catch_warnings():  # read-only on purpose: torch warns that it cannot write to it
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(array)


def teacher_outputs_for_run(ctx, teacher: nn.Module, pairing: Optional[FeaturePairing],
                            speed: Speed) -> TeacherOutputs:
    """The distill stage's entry point: the run's teacher, data and cache settings (a RunContext)."""
    from omegaconf import OmegaConf

    from kdrun.data.options import cache_key_options

    check_cacheable(ctx.data.train, ctx.data.name)
    dataset_cfg = cache_key_options(OmegaConf.to_container(ctx.cfg.dataset, resolve=True))
    spec = cache_spec(ctx.cfg.teacher.name, teacher, dataset_cfg, ctx.data.train, pairing, speed)
    return load_or_build(ctx.cache_root, spec, teacher, pairing, ctx.data.train, ctx.cfg.batch_size, ctx.device,
                         speed, float(ctx.cfg.teacher.cache_max_mb))

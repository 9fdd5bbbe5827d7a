"""`dataset.pack=true` for imagefolder: every image decoded and resized once into one uint8 file per split,
memory-mapped, and cropped/flipped/normalized a whole batch at a time on the batch's device, like the
in-memory datasets. Epochs then decode nothing: on a fast GPU the DataLoader + PIL path is the bottleneck.

Each image is stored as PIL's Resize(R) and an R x R square about its centre, R = the evaluation resize (256
for 224 px), placed so that evaluation (CenterCrop(size) of the square) gives exactly the PIL path's pixels. Training crops (RandomResizedCrop +
flip, kdrun/data/resized_crop.py) are drawn from that R x R centre square instead of the whole original
image: the sides of wide images are not seen, and a crop is resampled from 256 px rather than from the
original resolution (FFCV's trade-off, for the same reason).

An entry is `<pack_dir>/<folder>-<split>-<key>/` with images.npy (N, C, R, R), labels.npy and manifest.json.
The key hashes every file's path, size and modification time, the classes, R and the colour mode: a changed,
added or removed image makes a new entry (and the superseded one of that folder is deleted). An entry is
built in a hidden folder and renamed into place whole, under a file lock, so parallel runs build it once.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from filelock import FileLock
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from kdrun.data.bundle import DataBundle, InMemoryDataset
from kdrun.data.options import absolute_path, require_bool
from kdrun.data.resized_crop import CenterCrop, RandomResizedCropFlip, center_offsets
from kdrun.errors import KdrunError, one_line

log = logging.getLogger("kdrun")

PACK_FORMAT = 1
DISK_MARGIN = 1.05          # free space wanted over the entry's size
DECODE_BATCH = 64           # images per DataLoader batch while packing


def pack_side(image_size: int) -> int:
    """The stored side: imagefolder's evaluation resize (int(size * 256 / 224), 256 for 224)."""
    return int(image_size * 256 / 224)


class PackedDataset(InMemoryDataset):
    """uint8 images (N, C, R, R) memory-mapped on the host; `batch` gathers the rows, moves them to the
    dataset's device and crops there (RandomResizedCropFlip when augmenting, else the centre crop).

    `augment` is the random step only (None: deterministic, e.g. for teacher.cache); `to(device)` moves
    no images, only where batches go: a pack may be far larger than the GPU's memory.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, mean: Sequence[float], std: Sequence[float],
                 size: int, augment: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
                 device: torch.device | str = "cpu"):
        super().__init__(images, labels, mean, std, augment)
        self.size = size
        self.center = CenterCrop(size)
        self.device = torch.device(device)
        self._scale, self._shift = self._scale.to(self.device), self._shift.to(self.device)

    def batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        idx = torch.as_tensor(idx, dtype=torch.int64).cpu()
        images = self.images[idx]  # the gather: rows from the page cache (or the disk)
        if self.device.type == "cuda":
            images = images.pin_memory().to(self.device, non_blocking=True)
        images = self.augment(images) if self.augment is not None else self.center(images)
        return images.float() * self._scale - self._shift, self.labels[idx].to(self.device), idx.to(self.device)

    def to(self, device: torch.device | str) -> "PackedDataset":
        return PackedDataset(self.images, self.labels, self.mean, self.std, self.size, self.augment, device)


# --- the entry: key, build, load -------------------------------------------------------------------------

def pack_key(samples: Sequence[tuple[str, int]], classes: Sequence[str], sides: tuple[int, int], mode: str,
             split_dir: str) -> str:
    digest = hashlib.sha256(json.dumps([PACK_FORMAT, list(sides), mode, list(classes)]).encode())
    for path, label in samples:
        stat = os.stat(path)
        digest.update(f"{os.path.relpath(path, split_dir)}\0{label}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def entry_prefix(split_dir: str) -> str:
    """`<folder>-<split>-<hash of the split's absolute path>-`: two folders of one name never share entries."""
    split = Path(split_dir).resolve()
    where = hashlib.sha256(str(split).encode()).hexdigest()[:8]
    return f"{split.parent.name}-{split.name}-{where}-"


def square_offset(length: int, side: int, size: int) -> int:
    """Where the stored R-square starts along a side of `length` (>= R), so that CenterCrop(size) of the square
    lands exactly where PIL's CenterCrop(size) of the whole resized image does (both round half to even)."""
    outer, inner = center_offsets(length, length, size)[0], center_offsets(side, side, size)[0]
    return min(max(outer - inner, 0), length - side)


class _Decode(Dataset):
    """(position, uint8 C x R x R array or the one-line error) of each sample; errors travel as values, so
    a DataLoader worker's failure reaches the user as kdrun's one line, not a worker traceback."""

    def __init__(self, samples, loader, side: int, size: int):
        self.samples, self.loader, self.side, self.size = samples, loader, side, size
        self.resize = transforms.Resize(side)  # the shorter side to R, as the PIL path's evaluation transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        try:
            image = self.resize(self.loader(self.samples[i][0]))
        except KdrunError as err:
            return i, str(err)
        top = square_offset(image.height, self.side, self.size)
        left = square_offset(image.width, self.side, self.size)
        pixels = np.asarray(image.crop((left, top, left + self.side, top + self.side)), dtype=np.uint8)
        return i, (pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)).copy()


def _as_list(batch):
    return batch


def build_entry(entry: Path, samples, loader, side: int, size: int, channels: int, workers: int, classes) -> None:
    """Decode every sample into entry/ (written as a hidden sibling, renamed into place when complete)."""
    needed = len(samples) * channels * side * side
    entry.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(entry.parent).free
    if free < needed * DISK_MARGIN:
        raise KdrunError(f"dataset.pack=true needs {needed / 2**30:.1f} GB in {entry.parent} ({len(samples)} images "
                         f"at {side}x{side}), {free / 2**30:.1f} GB are free: pass dataset.pack_dir=PATH on a disk "
                         "with room, or dataset.pack=false")
    partial = entry.parent / f".{entry.name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    log.info("packing %d images of %s at %dx%d into %s (%.1f GB, once)", len(samples), Path(samples[0][0]).parents[1],
             side, side, entry, needed / 2**30)
    try:
        images = np.lib.format.open_memmap(partial / "images.npy", mode="w+", dtype=np.uint8,
                                           shape=(len(samples), channels, side, side))
        decoded = DataLoader(_Decode(samples, loader, side, size), batch_size=DECODE_BATCH, num_workers=workers,
                             collate_fn=_as_list)
        for batch in decoded:
            for position, pixels in batch:
                if isinstance(pixels, str):
                    raise KdrunError(pixels)
                images[position] = pixels
        images.flush()
        del images
        np.save(partial / "labels.npy", np.asarray([label for _, label in samples], dtype=np.int64))
        manifest = {"format": PACK_FORMAT, "count": len(samples), "channels": channels, "side": side,
                    "classes": list(classes)}
        (partial / "manifest.json").write_text(json.dumps(manifest))
        os.replace(partial, entry)
    except BaseException:  # an undecodable file, a full disk, Ctrl-C: no half-written pack is left behind
        shutil.rmtree(partial, ignore_errors=True)
        raise


def load_entry(entry: Path, count: int, channels: int, side: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The entry's images (copy-on-write memory map) and labels; None when incomplete or not as expected."""
    try:
        manifest = json.loads((entry / "manifest.json").read_text())
        images = np.load(entry / "images.npy", mmap_mode="c")  # private pages: writable, never written back
        labels = np.load(entry / "labels.npy")
    except (OSError, ValueError):
        return None
    if (manifest.get("format") != PACK_FORMAT or images.shape != (count, channels, side, side)
            or images.dtype != np.uint8 or labels.shape != (count,)):
        return None
    return torch.from_numpy(images), torch.from_numpy(labels)


def packed_split(folder, side: int, size: int, channels: int, pack_dir: str, workers: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The pack of one torchvision ImageFolder split (its samples, classes and loader): found, or built."""
    split_dir = folder.root
    prefix = entry_prefix(split_dir)
    entry = Path(pack_dir) / (prefix + pack_key(folder.samples, folder.classes, (side, size), str(channels), split_dir))
    try:
        Path(pack_dir).mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(Path(pack_dir) / f".{prefix}lock"))
        with lock:
            found = load_entry(entry, len(folder.samples), channels, side)
            if found is None:
                shutil.rmtree(entry, ignore_errors=True)  # incomplete or of another format: rebuilt
                build_entry(entry, folder.samples, folder.loader, side, size, channels, workers, folder.classes)
                found = load_entry(entry, len(folder.samples), channels, side)
            for stale in Path(pack_dir).glob(prefix + "*"):  # packs of this split's earlier contents
                if stale != entry and stale.is_dir():
                    shutil.rmtree(stale, ignore_errors=True)
    except OSError as err:
        raise KdrunError(f"dataset.pack_dir={pack_dir} cannot hold the packed images ({one_line(err)}): pass "
                         "dataset.pack_dir=PATH to a writable folder, or dataset.pack=false") from err
    if found is None:
        raise KdrunError(f"the packed images in {entry} do not read back: delete that folder and run again")
    return found


def wants_pack(options: dict[str, Any]) -> bool:
    return require_bool("pack", options.get("pack", False))


def packed_bundle(train_folder, test_folder, options: dict[str, Any], size: int, augment: bool, in_chans: int,
                  mean: Sequence[float], std: Sequence[float]) -> DataBundle:
    """imagefolder's DataBundle from packs of its two ImageFolder splits (kdrun/data/imagefolder.py's hook)."""
    side, workers = pack_side(size), int(options.get("num_workers") or 0)
    pack_dir = absolute_path(options["pack_dir"])
    train_images, train_labels = packed_split(train_folder, side, size, in_chans, pack_dir, workers)
    test_images, test_labels = packed_split(test_folder, side, size, in_chans, pack_dir, workers)
    train = PackedDataset(train_images, train_labels, mean, std, size, RandomResizedCropFlip(size) if augment else None)
    test = PackedDataset(test_images, test_labels, mean, std, size)
    return DataBundle(name="imagefolder", train=train, test=test, num_classes=len(train_folder.classes),
                      in_chans=in_chans, image_size=(size, size), class_names=list(train_folder.classes),
                      mean=tuple(mean), std=tuple(std))

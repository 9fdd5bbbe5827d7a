"""Stored teacher outputs: the documented file a teacher's answers travel in (README "Stored teacher outputs").

One NumPy `.npz` archive (numpy.savez; read with numpy.load(path, allow_pickle=False), from any framework):

    meta               0-d unicode array: JSON {"format": "kdrun-teacher-outputs", "version": 1,
                       "kind": "logits" | "topk" | "label", "k": int or null, "num_classes": K,
                       "dataset": name, "dataset_fingerprint": hex or null, "teacher": name}
    train_keys         (N,) int64 dataset indices (built-in sets) or unicode paths relative to the split's
                       folder, e.g. "cat/001.jpg" (imagefolder)
    train_logits       kind=logits: (N, K) float32 raw logits
    train_topk_ids     kind=topk: (N, k) int64 class ids, most probable first
    train_topk_probs   kind=topk: (N, k) float32 their probabilities at T=1 (each row sums to <= 1)
    train_labels       kind=label: (N,) int64 the teacher's predicted class
    test_*             the same for the test split (optional: the teacher's test metrics come from it)

Reading turns every kind into per-sample "logits" the loss terms take: logits as written; top-k as the
log of a full distribution whose remaining mass is spread evenly over the other classes (see
`topk_distribution`); a label as a one-hot row (only label-reading terms accept it, see stages/stored_teacher.py).
Every check of a file against the dataset is one line (KdrunError), raised before any training.
"""
from __future__ import annotations

import hashlib
import json
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from kdrun.data import DataBundle, InMemoryDataset
from kdrun.engine.evaluate import predict
from kdrun.errors import KdrunError
from kdrun.run_files import replacing

FORMAT = "kdrun-teacher-outputs"
VERSION = 1
KINDS = ("logits", "topk", "label")
SPLITS = ("train", "test")
ARRAYS = {"logits": ("logits",), "topk": ("topk_ids", "topk_probs"), "label": ("labels",)}
PROBABILITY_TOLERANCE = 1e-3   # float32 probabilities written elsewhere (an API's rounding) may miss 1 by this much
EXPORT_FILE = "teacher_outputs.npz"


# --- per-sample keys and the dataset's fingerprint -----------------------------------------------------------------

def sample_keys(dataset: Dataset) -> np.ndarray:
    """Each sample's key, by position: its path relative to the split folder (imagefolder), else its index."""
    base = getattr(dataset, "base", None)
    samples, root = getattr(base, "samples", None), getattr(base, "root", None)
    if samples is not None and root is not None:
        return np.array([Path(os.path.relpath(path, root)).as_posix() for path, _ in samples], dtype=np.str_)
    return np.arange(len(dataset), dtype=np.int64)


def sample_labels(dataset: Dataset) -> torch.Tensor:
    """The true labels, by position, without loading an image where the dataset keeps them apart."""
    if isinstance(dataset, InMemoryDataset):
        return dataset.labels.cpu()
    targets = getattr(getattr(dataset, "base", None), "targets", None)
    if targets is not None:
        return torch.as_tensor(targets, dtype=torch.int64)
    return torch.tensor([int(dataset[i][1]) for i in range(len(dataset))], dtype=torch.int64)


def dataset_fingerprint(data: DataBundle) -> str:
    """A hash of what makes a dataset version: its name, classes, each split's keys and labels (and, for sets
    held in memory, their pixels). Another split seed, test fraction or set of files gives another hash."""
    digest = hashlib.sha256(json.dumps([data.name, data.num_classes]).encode())
    for split in (data.train, data.test):
        keys = sample_keys(split)
        digest.update(keys.tobytes() if keys.dtype.kind != "U" else "\n".join(keys.tolist()).encode())
        digest.update(sample_labels(split).numpy().astype(np.int64).tobytes())
        if isinstance(split, InMemoryDataset):
            digest.update(split.images.cpu().numpy().tobytes())
    return digest.hexdigest()[:32]


# --- writing --------------------------------------------------------------------------------------------------------

def outputs_of_kind(logits: torch.Tensor, kind: str, k: Optional[int]) -> dict[str, np.ndarray]:
    """A split's arrays of one kind, from the teacher's logits (top-k probabilities at T=1)."""
    if kind == "logits":
        return {"logits": logits.float().cpu().numpy()}
    if kind == "topk":
        probabilities, ids = logits.float().softmax(1).topk(k, dim=1)
        return {"topk_ids": ids.cpu().numpy().astype(np.int64), "topk_probs": probabilities.cpu().numpy()}
    return {"labels": logits.argmax(1).cpu().numpy().astype(np.int64)}


def write_outputs(path: Path, kind: str, k: Optional[int], data: DataBundle, teacher_name: str,
                  logits_by_split: dict[str, torch.Tensor]) -> Path:
    """Write one file (atomically: a reader never sees half of it) for the splits given, in dataset order."""
    k = int(k) if kind == "topk" else None
    if k is not None and not 1 <= k <= data.num_classes:
        raise KdrunError(f"teacher.export_k={k} must be between 1 and the dataset's {data.num_classes} classes")
    meta = {"format": FORMAT, "version": VERSION, "kind": kind, "k": k, "num_classes": data.num_classes,
            "dataset": data.name, "dataset_fingerprint": dataset_fingerprint(data), "teacher": teacher_name}
    arrays = {"meta": np.array(json.dumps(meta))}
    for split, logits in logits_by_split.items():
        arrays[f"{split}_keys"] = sample_keys(getattr(data, split))
        arrays.update({f"{split}_{name}": value for name, value in outputs_of_kind(logits, kind, k).items()})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with replacing(path) as tmp, open(tmp, "wb") as handle:
        np.savez(handle, **arrays)
    return path


def export_teacher(model: nn.Module, data: DataBundle, path: Path, kind: str, k: Optional[int], teacher_name: str,
                   batch_size: int, device: torch.device) -> Path:
    """Run the teacher over the training and test splits (eval mode, in order) and write its outputs."""
    logits = {split: predict(model, getattr(data, split), batch_size, device)[0] for split in SPLITS}
    return write_outputs(path, kind, k, data, teacher_name, logits)


# --- reading and checking --------------------------------------------------------------------------------------------

@dataclass
class StoredSplit:
    keys: np.ndarray
    arrays: dict[str, np.ndarray]


@dataclass
class StoredFile:
    path: Path
    meta: dict
    splits: dict[str, StoredSplit]

    @property
    def kind(self) -> str:
        return self.meta["kind"]

    @property
    def k(self) -> Optional[int]:
        return self.meta.get("k")


def read_outputs(path: Path) -> StoredFile:
    """The file's header and arrays, or one line saying what is wrong with its layout."""
    where = f"teacher.outputs={path}"
    try:
        with np.load(path, allow_pickle=False) as archive:
            contents = {name: archive[name] for name in archive.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as error:
        raise KdrunError(f"{where} is not a teacher-outputs file (a NumPy .npz archive; {error}): write it with "
                         "`kdrun paradigm=teacher teacher.export_outputs=true` or as README \"Stored teacher outputs\" "
                         "says") from error
    try:
        meta = json.loads(str(contents.pop("meta")))
    except (KeyError, ValueError) as error:
        raise KdrunError(f"{where} has no readable `meta` entry (JSON with format, version, kind): see README "
                         "\"Stored teacher outputs\"") from error
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise KdrunError(f"{where}: its meta.format is {meta.get('format') if isinstance(meta, dict) else meta!r}, "
                         f"not {FORMAT!r}: pass a file written by teacher.export_outputs=true")
    if meta.get("version") != VERSION:
        raise KdrunError(f"{where} is version {meta.get('version')} of the format; this kdrun reads version {VERSION}: "
                         "export the outputs again with this kdrun")
    if meta.get("kind") not in KINDS:
        raise KdrunError(f"{where}: meta.kind={meta.get('kind')!r} must be one of {', '.join(KINDS)}")
    splits = {}
    for split in SPLITS:
        names = [f"{split}_{name}" for name in ("keys", *ARRAYS[meta["kind"]])]
        present = [name for name in names if name in contents]
        if split == "train" or present:
            missing = [name for name in names if name not in contents]
            if missing:
                raise KdrunError(f"{where} (kind {meta['kind']}) lacks the array(s) {', '.join(missing)}")
            splits[split] = StoredSplit(contents[names[0]], {n.split("_", 1)[1]: contents[n] for n in names[1:]})
    return StoredFile(Path(path), meta, splits)


def check_against(stored: StoredFile, data: DataBundle) -> None:
    """Each way the file can fail to describe this dataset, one line each, in this order: classes, split sizes,
    duplicate keys, keys of no sample, NaN/inf, probabilities, and a file of another version of the dataset."""
    where, kind, k = f"teacher.outputs={stored.path}", stored.kind, stored.k
    classes = stored.meta.get("num_classes")
    widths = {s: part.arrays["logits"].shape[1:] for s, part in stored.splits.items() if kind == "logits"}
    if classes != data.num_classes or any(w != (data.num_classes,) for w in widths.values()):
        shown = classes if classes != data.num_classes else next(w for w in widths.values() if w != (classes,))
        raise KdrunError(f"{where} holds outputs over {shown} classes but dataset {data.name} has {data.num_classes}: "
                         "export the teacher's outputs on this dataset")
    for split, part in stored.splits.items():
        check_split(where, split, part, kind, k, data)
    recorded = stored.meta.get("dataset_fingerprint")
    if recorded and recorded != dataset_fingerprint(data):
        raise KdrunError(f"{where} was written for another version of dataset {stored.meta.get('dataset')} (its "
                         f"samples, labels or split differ from this run's {data.name}: another split seed, test "
                         "fraction or set of files): export the teacher's outputs again on this dataset")


def check_split(where: str, split: str, part: StoredSplit, kind: str, k: Optional[int], data: DataBundle) -> None:
    dataset, expected = getattr(data, split), sample_keys(getattr(data, split))
    keys, rows = part.keys, len(part.keys)
    if any(len(value) != rows for value in part.arrays.values()):
        raise KdrunError(f"{where}: its {split} arrays have different row counts "
                         f"({', '.join(f'{n}: {len(v)}' for n, v in part.arrays.items())}, keys: {rows})")
    if rows != len(dataset):
        missing = sorted(set(expected.tolist()) - set(keys.tolist()))
        detail = f" (missing keys: {_few(missing)})" if missing and rows < len(dataset) else ""
        raise KdrunError(f"{where}: its {split} split has {rows} rows but dataset {data.name} has {len(dataset)} "
                         f"{split} samples{detail}: export the teacher's outputs on this dataset")
    values, counts = np.unique(keys, return_counts=True)
    if (counts > 1).any():
        raise KdrunError(f"{where}: its {split} split lists key(s) {_few(values[counts > 1].tolist())} more than "
                         "once (duplicate keys): each sample needs exactly one row")
    unknown = sorted(set(keys.tolist()) - set(expected.tolist()))
    if unknown:
        what, form = (("files", "paths relative to the split folder") if expected.dtype.kind == "U"
                      else ("sample indices", "indices from 0"))
        raise KdrunError(f"{where}: key(s) {_few(unknown)} of its {split} split match none of dataset {data.name}'s "
                         f"{split} {what} (keys are {form}): export the teacher's outputs on this dataset")
    for name, value in part.arrays.items():
        if value.dtype.kind == "f" and not np.isfinite(value).all():
            bad = np.flatnonzero(~np.isfinite(value.reshape(rows, -1)).all(1))
            raise KdrunError(f"{where}: its {split}_{name} hold NaN or inf for {len(bad)} sample(s) "
                             f"(keys {_few(keys[bad].tolist())}): every value must be a finite number")
    if kind == "topk":
        check_topk(where, split, part, k, data.num_classes)
    if kind == "label" and not ((part.arrays["labels"] >= 0) & (part.arrays["labels"] < data.num_classes)).all():
        raise KdrunError(f"{where}: its {split}_labels hold class ids outside 0..{data.num_classes - 1}")


def check_topk(where: str, split: str, part: StoredSplit, k: Optional[int], num_classes: int) -> None:
    ids, probabilities = part.arrays["topk_ids"], part.arrays["topk_probs"]
    if k is None or ids.shape[1:] != (k,) or probabilities.shape[1:] != (k,) or not 1 <= k <= num_classes:
        raise KdrunError(f"{where}: meta.k={k} but its {split} top-k arrays are {ids.shape} and {probabilities.shape}; "
                         f"k must be between 1 and {num_classes}")
    if ((ids < 0) | (ids >= num_classes)).any():
        raise KdrunError(f"{where}: its {split}_topk_ids hold class ids outside 0..{num_classes - 1}")
    if any(len(set(row)) != k for row in ids.tolist()):
        raise KdrunError(f"{where}: a row of its {split}_topk_ids names a class twice")
    sums = probabilities.astype(np.float64).sum(1)
    tol = PROBABILITY_TOLERANCE
    bad = (probabilities < 0).any(1) | (sums > 1 + tol) | ((sums < 1 - tol) if k == num_classes else False)
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        rule = "sum to 1" if k == num_classes else "sum to at most 1 (the rest is spread over the other classes)"
        raise KdrunError(f"{where}: the top-{k} probabilities of {int(bad.sum())} {split} sample(s) are not a "
                         f"distribution (key {part.keys[first]} sums to {sums[first]:.4g}); probabilities at T=1 "
                         f"must be >= 0 and {rule}")


def _few(values: list, shown: int = 5) -> str:
    text = ", ".join(map(str, values[:shown]))
    return text + (f" and {len(values) - shown} more" if len(values) > shown else "")


# --- what the loss terms read -------------------------------------------------------------------------------------

def topk_distribution(ids: torch.Tensor, probabilities: torch.Tensor, num_classes: int) -> torch.Tensor:
    """The full distribution (B, K) a top-k answer stands for: the k given probabilities where they are,
    the remaining mass 1 - sum(p_topk) spread evenly over the other K - k classes (the uniform-remainder
    convention of label smoothing, Szegedy et al., CVPR 2016, applied to a truncated top-k posterior as in
    Orekondy et al., "Knockoff Nets", CVPR 2019). With k = K the answer is the whole distribution already."""
    probabilities = probabilities.double()
    rest = (1.0 - probabilities.sum(1, keepdim=True)).clamp_min(0.0)
    others = num_classes - ids.shape[1]
    full = (rest / others).expand(-1, num_classes).clone() if others else torch.zeros(len(ids), num_classes,
                                                                                          dtype=torch.float64)
    full.scatter_(1, ids.long(), probabilities)
    return full / full.sum(1, keepdim=True)  # float rounding of an API's answers: back to exactly 1


def as_logits(part: StoredSplit, kind: str, num_classes: int) -> torch.Tensor:
    """(N, K) float32 rows in file order: logits; log-probabilities of the top-k distribution (floored at the
    smallest float32, so a class with no mass stays finite); the one-hot label."""
    if kind == "logits":
        return torch.from_numpy(np.ascontiguousarray(part.arrays["logits"], dtype=np.float32))
    if kind == "topk":
        full = topk_distribution(torch.from_numpy(part.arrays["topk_ids"]),
                                 torch.from_numpy(part.arrays["topk_probs"]), num_classes)
        return full.clamp_min(torch.finfo(torch.float32).tiny).log().float()
    return F.one_hot(torch.from_numpy(part.arrays["labels"]).long(), num_classes).float()


def in_dataset_order(part: StoredSplit, rows: torch.Tensor, dataset: Dataset) -> torch.Tensor:
    """`rows` (file order) reordered so that row i is the dataset's sample i (the checks ran first)."""
    expected = sample_keys(dataset)
    if expected.dtype.kind != "U":
        order = np.empty(len(expected), dtype=np.int64)
        order[part.keys.astype(np.int64)] = np.arange(len(part.keys))
    else:
        row_of = {key: i for i, key in enumerate(part.keys.tolist())}
        order = np.array([row_of[key] for key in expected.tolist()], dtype=np.int64)
    return rows[torch.from_numpy(order)]

"""Checkpoints: written atomically, read back with one-line errors for every way they can be wrong.

Every file kdrun writes holds tensors and plain Python values only (training state included: RNG
states are stored as tensors and numbers), so each one loads under torch.load(weights_only=True),
the only way kdrun reads a checkpoint.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np
import torch
from torch import nn

from kdrun.errors import KdrunError

FORMAT = "kdrun-checkpoint"

# Checkpoints of earlier kdrun versions hold numpy's RNG state as an array (uint32): allowing the
# array's reconstruction by name keeps them loadable without unpickling arbitrary objects.
_EARLIER_NUMPY_GLOBALS = [np.zeros(1).__reduce__()[0], np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def save_atomic(obj: Any, path: Path, keep_previous: Optional[Path] = None) -> None:
    """Write to a temporary file and rename it: a kill mid-write never leaves a truncated file.

    With `keep_previous`, the file being replaced is first renamed there (also atomic), so a good
    older copy survives a new file that later turns out unreadable.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(obj, tmp)
    if keep_previous is not None and path.is_file():
        os.replace(path, keep_previous)
    os.replace(tmp, path)


def copy_atomic(source: Path, path: Path) -> None:
    """A copy that appears whole or not at all, like every file save_atomic writes."""
    tmp = Path(path).with_name(f".{Path(path).name}.tmp{os.getpid()}")
    shutil.copyfile(source, tmp)
    os.replace(tmp, path)


def model_checkpoint(model: nn.Module, meta: Mapping[str, Any], stage: str, **extra: Any) -> dict:
    """The one checkpoint layout kdrun writes: format tag, the model's metadata (model_name, num_classes,
    in_chans, dataset), the stage that wrote it, the weights, and whatever else the writer keeps
    (history, training state); loadable with teacher.checkpoint=PATH or student.checkpoint=PATH."""
    return {"format": FORMAT, "version": 1, **meta, "stage": stage, "model": model.state_dict(), **extra}


def save_model(path: Path, model: nn.Module, meta: Mapping[str, Any], stage: str, **extra: Any) -> None:
    save_atomic(model_checkpoint(model, meta, stage, **extra), path)


def load_file(path: str | Path) -> Any:
    """torch.load limited to tensors and plain values (weights_only=True), onto the CPU; raises as torch.load does."""
    with torch.serialization.safe_globals(_EARLIER_NUMPY_GLOBALS):
        return torch.load(path, map_location="cpu", weights_only=True)


def is_kdrun_checkpoint(obj: Any) -> bool:
    return isinstance(obj, Mapping) and obj.get("format") == FORMAT


def read_checkpoint(path: str | Path, option: str) -> Any:
    """Load a file given by the user (through `option`), or raise a one-line error."""
    path = Path(path).expanduser()
    if not path.exists():
        raise KdrunError(f"{option}={path}: no such file; pass the path of a kdrun checkpoint "
                         "(e.g. outputs/runs/.../checkpoints/best.pt) or of a saved state dict")
    if path.is_dir():
        raise KdrunError(f"{option}={path} is a directory; pass a checkpoint file such as {path}/best.pt")
    try:
        return load_file(path)
    except Exception as error:  # unpicklers fail on garbage in many ways (IndexError, KeyError, ...)
        raise KdrunError(f"{option}={path} is not a readable checkpoint ({type(error).__name__}); "
                         "pass a file written by torch.save (a kdrun checkpoint or a state dict)") from error


def extract_state_dict(obj: Any, option: str, path: str | Path) -> dict[str, torch.Tensor]:
    """Accept a kdrun checkpoint, a plain state dict, or the common {'state_dict': ...} wrappers."""
    if is_kdrun_checkpoint(obj):
        return obj["model"]
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    if isinstance(obj, Mapping) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        # Checkpoints saved from DDP or torch.compile prefix every key; strip it.
        for prefix in ("module.", "_orig_mod."):
            if all(k.startswith(prefix) for k in obj):
                obj = {k[len(prefix):]: v for k, v in obj.items()}
        return dict(obj)
    raise KdrunError(f"{option}={path} holds no model weights (expected a kdrun checkpoint or a state dict "
                     "of tensors)")


def load_model_weights(model: nn.Module, path: str | Path, option: str, model_name: str,
                       num_classes: int) -> dict:
    """Load `path` into `model`, checking architecture and class count. Returns the checkpoint's metadata."""
    obj = read_checkpoint(path, option)
    meta = {k: v for k, v in obj.items() if k not in ("model", "optimizer", "scheduler", "loss")} \
        if is_kdrun_checkpoint(obj) else {}
    if meta.get("num_classes") not in (None, num_classes):
        raise KdrunError(f"{option}={path} was trained for {meta['num_classes']} classes but the dataset has "
                         f"{num_classes}; use a checkpoint trained on this dataset or pick the matching dataset")
    channels = model_in_chans(model)
    if meta.get("in_chans") is not None and channels > 0 and meta["in_chans"] != channels:
        raise KdrunError(f"{option}={path} was trained on {meta['in_chans']}-channel images but the dataset has "
                         f"{channels} channels; use a checkpoint trained on this dataset or pick the matching dataset")
    saved_name = meta.get("model_name")
    if str(saved_name).startswith("peers:"):
        raise KdrunError(f"{option}={path} holds all the peers of an online run; pass one peer's own checkpoint, "
                         f"e.g. {Path(path).parent}/peer0.pt")
    if saved_name and saved_name != model_name:
        role = option.split(".")[0]
        raise KdrunError(f"{option}={path} holds a '{saved_name}' but {role}.name is '{model_name}'; "
                         f"pass {role}.name={saved_name}")
    state = extract_state_dict(obj, option, path)
    expected = model.state_dict()
    mismatched = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if mismatched:
        key = mismatched[-1]
        got, want = tuple(state[key].shape), tuple(expected[key].shape)
        classifier = _classifier_key(expected).rsplit(".", 1)[0]
        if key.rsplit(".", 1)[0] == classifier and got[1:] == want[1:]:
            raise KdrunError(f"{option}={path} has {got[0]} output classes but the dataset has {want[0]}; "
                             "use a checkpoint trained on this dataset or pick the matching dataset")
        if key == _stem_key(expected) and len(got) == 4 and got[0] == want[0] and got[2:] == want[2:]:
            raise KdrunError(f"{option}={path} takes {got[1]}-channel images but the dataset has {want[1]} "
                             "channels; use a checkpoint trained on this dataset or pick the matching dataset")
        raise KdrunError(f"{option}={path} does not fit '{model_name}': '{key}' has shape {got}, the model "
                         f"expects {want}; check the model name and the dataset's channels/classes")
    if missing or unexpected:
        example = (missing or unexpected)[0]
        raise KdrunError(f"{option}={path} does not fit '{model_name}' ({len(missing)} missing and "
                         f"{len(unexpected)} unexpected keys, e.g. '{example}'); check the model name")
    model.load_state_dict(state)
    return meta


def model_in_chans(model: nn.Module) -> int:
    """Input channels: those of the first convolution's weight (every model kdrun builds has one)."""
    state = model.state_dict()
    key = _stem_key(state)
    return int(state[key].shape[1]) if key else -1


def _stem_key(state: Mapping[str, torch.Tensor]) -> str:
    """The weight of the first 4-D layer: the stem convolution, which sets the input channels."""
    return next((k for k, v in state.items() if k.endswith("weight") and v.dim() == 4), "")


def _classifier_key(state: Mapping[str, torch.Tensor]) -> str:
    """The weight of the last 2-D layer: the classifier, in the models kdrun builds."""
    two_d = [k for k, v in state.items() if k.endswith("weight") and v.dim() == 2]
    return two_d[-1] if two_d else ""

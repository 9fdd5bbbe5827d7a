"""Export of a trained model to files another runtime loads, and the sidecar that says how to feed it.

One `torch.export` program is the source of the ONNX file and of the `.pt2` program: the ONNX file comes
from torch's own exporter (the torch.export-based one, maintained; it needs `onnxscript`), self-contained
(weights inside), with a dynamic batch dimension. TorchScript comes from `torch.jit.trace`, which torch
deprecates; it is kept for runtimes that still load it.
"""
from __future__ import annotations

import contextlib
import json
import logging
import re
import warnings
from pathlib import Path
from typing import Iterable

import torch
from torch import nn

from kdrun.config.deploy_checks import EXPORT_FORMATS
from kdrun.data import DataBundle
from kdrun.errors import KdrunError, one_line

# export=NAME -> the file it writes in RUN_DIR/export/
FORMATS = dict(zip(EXPORT_FORMATS, ("student.onnx", "student.pt2", "student.torchscript.pt")))
PREPROCESSING_FILE = "preprocessing.json"
ONNX_OPSET = 18


def export_model(model: nn.Module, example: torch.Tensor, directory: Path, formats: Iterable[str],
                 model_name: str) -> dict[str, Path]:
    """Write `model` (in eval mode, on the CPU) in each of `formats` into `directory`; their paths.
    A model that cannot be exported raises a one-line KdrunError naming the model and, where the
    exporter says, the operator."""
    formats = list(formats)
    model = model.eval()
    directory.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    program = None
    if "onnx" in formats or "program" in formats:
        program = export_program(model, example, model_name, "onnx" if "onnx" in formats else "program")
    for name in formats:
        path = directory / FORMATS[name]
        if name == "program":
            torch.export.save(program, str(path))
        elif name == "onnx":
            write_onnx(program, example, path, model_name)
        elif name == "torchscript":
            write_torchscript(model, example, path, model_name)
        written[name] = path
    return written


def export_program(model: nn.Module, example: torch.Tensor, model_name: str, target: str):
    """torch.export's program of `model` with a dynamic batch size."""
    batch = torch.export.Dim("batch", min=1, max=65536)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
    except Exception as error:  # torch.export raises many types (UserError, Unsupported, GuardOnDataDependent...)
        raise KdrunError(export_failure(target, model_name, error)) from error


def quiet_exporter():
    """The ONNX exporter's optimizer logs each pass at INFO through the root logger kdrun's log writes to."""
    return quiet_logs(("onnxscript", "onnx_ir", "torch.onnx"), logging.WARNING)


@contextlib.contextmanager
def quiet_logs(names: Iterable[str], level: int):
    """These loggers at `level` and warnings ignored for the block: a library's messages, not the user's."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(level)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def write_onnx(program, example: torch.Tensor, path: Path, model_name: str) -> None:
    try:
        import onnxscript  # noqa: F401  (the exporter's own dependency: say so before it fails deep inside)
    except ImportError as error:
        raise KdrunError("export=onnx needs the onnx and onnxscript packages: pip install \"kdrun[deploy]\"") from error
    try:
        with quiet_exporter():
            torch.onnx.export(program, (example,), str(path), input_names=["images"], output_names=["logits"],
                              opset_version=ONNX_OPSET, external_data=False, verbose=False, report=False)
    except Exception as error:
        raise KdrunError(export_failure("onnx", model_name, error)) from error


def write_torchscript(model: nn.Module, example: torch.Tensor, path: Path, model_name: str) -> None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # jit.trace is deprecated in recent torch; the file still loads
            traced = torch.jit.trace(model, example, check_trace=False)
        traced.save(str(path))
    except Exception as error:
        raise KdrunError(export_failure("torchscript", model_name, error)) from error


def export_failure(target: str, model_name: str, error: BaseException) -> str:
    """The one line for a model that does not export: the operator where the message names one."""
    return (f"export={target}: student {model_name} cannot be exported: {failure_cause(error)}; the training results "
            f"are kept in metrics.json: export another format (export=program, export=torchscript) or pass export=none")


def failure_cause(error: BaseException) -> str:
    """Why torch.export or the ONNX exporter failed, in a few words: the operator where the message names one."""
    text = str(error)
    operator = re.search(r"\baten[.:]{1,2}[A-Za-z_0-9.]+", text)
    if "data-dependent" in text or "data dependent" in text:
        cause = "it has data-dependent control flow (an `if` or a loop on tensor values)"
    elif operator:
        cause = f"operator {operator.group(0)} is not supported"
    else:
        cause = one_line(error)
    return cause


def write_preprocessing(directory: Path, data: DataBundle, model_name: str, files: dict[str, Path]) -> Path:
    """The sidecar JSON a deployment reads: the input the model expects and how to make it from pixels."""
    height, width = data.image_size
    sidecar = {
        "format_version": 1,
        "model": model_name,
        "files": {name: path.name for name, path in files.items()},
        "input": {"name": "images", "layout": "NCHW", "dtype": "float32", "channels": data.in_chans,
                  "height": height, "width": width},
        # x = (pixel / 255 - mean) / std, per channel, after resizing to height x width
        "normalize": {"pixel_scale": 1 / 255, "mean": list(data.mean), "std": list(data.std)},
        "output": {"name": "logits", "num_classes": data.num_classes, "class_names": list(data.class_names),
                   "probabilities": "softmax(logits)"},
    }
    path = directory / PREPROCESSING_FILE
    path.write_text(json.dumps(sidecar, indent=2) + "\n")
    return path

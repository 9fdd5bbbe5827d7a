"""Checks of what a run ships (export=, quantize=), before torch loads."""
from __future__ import annotations

from omegaconf import DictConfig, ListConfig

from kdrun.errors import KdrunError
from kdrun.registry import did_you_mean

EXPORT_FORMATS = ("onnx", "program", "torchscript")
QUANTIZATIONS = ("none", "int8")


def check_deploy(cfg: DictConfig) -> None:
    setting = cfg.get("export")
    if setting is not None and not isinstance(setting, (str, ListConfig, list)):
        raise KdrunError(f"export={setting} must be a format or a list of them: export=onnx or export=[onnx,program]")
    names = [setting] if isinstance(setting, str) else list(setting or [])
    for name in names:
        if str(name).lower() in ("none", "") and len(names) == 1:
            continue
        if name not in EXPORT_FORMATS:
            raise KdrunError(f"export={name} is not an export format: choose from {', '.join(EXPORT_FORMATS)} "
                             f"(or a list: export=[onnx,program]){did_you_mean(str(name), EXPORT_FORMATS)}")
    quantize = cfg.quantize
    if quantize.name not in QUANTIZATIONS:
        raise KdrunError(f"quantize.name={quantize.name} is not a quantization: choose quantize=int8 or quantize=none"
                         f"{did_you_mean(str(quantize.name), QUANTIZATIONS)}")
    if quantize.calibration < 1:
        raise KdrunError(f"quantize.calibration={quantize.calibration} must be >= 1 training images, "
                         "e.g. quantize.calibration=512")
